//! Subcommands of the verbalizer layer: `profile` (a zero-shot verbalizer profile measured on a model),
//! `directions` (labelled concept directions), `explain` (features x conditions -> resumable JSONL), `eval`
//! (lift, label scores, plots, report) and `experiment` (the whole cross-model pipeline for one pair).

use crate::commands::{
    self, bar, corpus_ref, created_by, open_kind, spinner, DtypeArg, FitMapArgs, WashoutArgs,
};
use crate::runtime_cmds::{self, device, CaptureArgs, DeviceArg, PrecisionArg};
use avb_core::artifact::{
    self, check_map_for_verbalizer, check_washout_for_map, file_name, file_sha256, Artifact, Body,
    ConceptDirectionsMeta, NamedTensor, RidgeMapMeta, Space, WashoutMeta,
};
use avb_core::directions::concept_directions;
use avb_core::features::FeatureSource;
use avb_core::io::write_atomic;
use avb_core::ridge::AffineMap;
use avb_core::{AvbError, Matrix, Result};
use avb_model::registry;
use avb_nla::concepts::{wiki_groups, ConceptGroup};
use avb_nla::eval::{self, Arm, EvalOptions, Evaluation, Scored};
use avb_nla::explain::{
    self, AvInfo, Condition, Feature, FileRef, Job, PlanInputs, Record, RecordWriter, Settings,
};
use avb_nla::profiles::{make_profile, ProfileOptions};
use avb_nla::reconstructor::{ar_scores, Reconstructor};
use avb_nla::{ExplainOptions, Verbalizer};
use avb_runtime::capture::{capture, CaptureOptions};
use avb_runtime::{loader, Sampling, SentenceEmbedder};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

const WIKI_CORPUS: &str = include_str!("../../../tests/fixtures/corpus/wiki_en_sentences.jsonl");
const WASHOUT_CORPUS: &str =
    include_str!("../../../tests/fixtures/corpus/washout_multilingual.jsonl");

/// The registry's default block for a model (near 70% depth), or the one given.
fn layer_for(model: &str, given: Option<usize>) -> Result<usize> {
    given
        .or_else(|| registry::find(model).ok().and_then(|a| a.layer))
        .ok_or_else(|| AvbError::Invalid(format!("{model}: give the layer (no registry default)")))
}

fn wiki_summaries() -> Result<PathBuf> {
    let dir = registry::ensure("wiki-summaries")?;
    Ok(dir.with_file_name("summaries_en-us.json"))
}

// ---------------- profile ----------------

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// A name from `avb models list`, a .gguf file or an HF checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// Block whose input is patched: 0 replaces the input embedding (the NLA protocol); default num_layers / 6
    /// (a residual patch a few blocks in, where zero-shot answers are most topical; zero-shot-probe.md).
    #[arg(long)]
    pub injection_layer: Option<usize>,
    /// The block whose output the vectors come from (default: the registry layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// injection_scale = this x the measured mean norm at the site.
    #[arg(long, default_value_t = 1.0)]
    pub multiplier: f64,
    /// Prompt with `{injection_char}` where the vector goes (default: a one-question prompt, chat-formatted on
    /// instruct models, a Q/A completion on base models).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: usize,
    /// Texts the site's norm is measured on (first N lines of the embedded Wikipedia sentences by default).
    #[arg(long, default_value_t = 100)]
    pub n_texts: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn profile_cmd(a: ProfileArgs) -> Result<()> {
    let dev = device(a.device)?;
    let pb = spinner(&format!("loading {}", a.model));
    let lm = loader::open(&a.model, &dev, avb_runtime::Precision::F32)?;
    pb.finish_and_clear();
    let n_layers = lm.model.config.num_layers;
    let texts: Vec<String> = embedded_texts(WIKI_CORPUS)?
        .into_iter()
        .take(a.n_texts)
        .collect();
    let opts = ProfileOptions {
        injection_layer: a
            .injection_layer
            .unwrap_or(((n_layers as f64) / 6.0).round() as usize),
        extraction_layer: layer_for(&lm.name, a.layer)?,
        multiplier: a.multiplier,
        prompt: a.prompt.clone(),
        max_new_tokens: a.max_new_tokens,
        corpus_name: "wiki_en_sentences.jsonl (embedded)".into(),
        model_sha256: file_sha256(&lm.path).unwrap_or_default(),
    };
    let pb = spinner("measuring the injection site's norm");
    let meta = make_profile(&lm, &texts, &opts)?;
    pb.finish_and_clear();
    let yaml = format!(
        "# Zero-shot verbalizer profile made by `avb profile --model {}` (avb {}).\n{}",
        a.model,
        env!("CARGO_PKG_VERSION"),
        meta.to_yaml()?
    );
    write_atomic(&a.output, &[yaml.as_bytes()])?;
    let z = meta.avbridge.as_ref().map(|z| z.scale_measured.clone());
    println!(
        "wrote {}: placeholder `{}` (id {}), injection at the input of block {}, scale {:.3} (mean site norm {:.3} over {} tokens)",
        a.output.display(),
        meta.tokens.injection_char,
        meta.tokens.injection_token_id,
        opts.injection_layer,
        meta.injection_norm().unwrap_or(f64::NAN),
        z.as_ref().map_or(f64::NAN, |z| z.mean_norm),
        z.as_ref().map_or(0, |z| z.n_tokens),
    );
    Ok(())
}

fn embedded_texts(jsonl: &str) -> Result<Vec<String>> {
    commands::jsonl_field(jsonl, Path::new("embedded corpus"), "text")
}

// ---------------- directions ----------------

#[derive(clap::Args, Debug)]
pub struct DirectionsArgs {
    #[arg(long)]
    pub model: String,
    /// Block K (default: the registry layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// `wiki`: the labelled concept groups of concepts.json over the Wikipedia summaries; or a JSONL file of
    /// {"id", "text", "label"} lines (lines without a label only enter the corpus mean).
    #[arg(long, default_value = "wiki")]
    pub groups: String,
    /// Texts per wiki group.
    #[arg(long, default_value_t = 16)]
    pub per_group: usize,
    /// Wiki groups with fewer matching articles are dropped.
    #[arg(long, default_value_t = 12)]
    pub min_group: usize,
    /// Extra unlabelled Wikipedia sentences in the corpus mean (wiki groups only).
    #[arg(long, default_value_t = 200)]
    pub background: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Output concept_directions artifact; the texts used are written beside it as <stem>.corpus.jsonl.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// (id, text, label) lines of the labelled corpus.
fn labelled_corpus(a: &DirectionsArgs) -> Result<Vec<(String, String, Option<String>)>> {
    if a.groups != "wiki" {
        let path = Path::new(&a.groups);
        let text = std::fs::read_to_string(path).map_err(|e| AvbError::io(path, e))?;
        let ids = commands::jsonl_field(&text, path, "id")?;
        let texts = commands::jsonl_field(&text, path, "text")?;
        let labels = commands::jsonl_values(&text, path)?
            .iter()
            .map(|v| v["label"].as_str().map(str::to_string))
            .collect::<Vec<_>>();
        return Ok(ids
            .into_iter()
            .zip(texts)
            .zip(labels)
            .map(|((i, t), l)| (i, t, l))
            .collect());
    }
    let groups: Vec<ConceptGroup> =
        wiki_groups(&wiki_summaries()?, a.per_group, a.min_group, a.seed)?;
    let mut out = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for g in &groups {
        for (title, text) in g.titles.iter().zip(&g.texts) {
            used.insert(text.clone());
            out.push((format!("wiki:{title}"), text.clone(), Some(g.label.clone())));
        }
    }
    for (i, text) in embedded_texts(WIKI_CORPUS)?
        .into_iter()
        .filter(|t| !used.contains(t))
        .take(a.background)
        .enumerate()
    {
        out.push((format!("background-{i:04}"), text, None));
    }
    Ok(out)
}

pub fn directions_cmd(a: DirectionsArgs) -> Result<()> {
    let corpus = labelled_corpus(&a)?;
    let mut labels: Vec<String> = Vec::new();
    for l in corpus.iter().filter_map(|(_, _, l)| l.as_ref()) {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    if labels.is_empty() {
        return Err(AvbError::Empty {
            what: a.groups.clone(),
            detail: "no labelled texts".into(),
            fix: "give lines with a \"label\" field (or use --groups wiki)".into(),
        });
    }
    let stem = a
        .output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "directions".into());
    let corpus_path = a.output.with_file_name(format!("{stem}.corpus.jsonl"));
    let mut jsonl = String::new();
    for (id, text, label) in &corpus {
        jsonl.push_str(&serde_json::json!({"id": id, "text": text, "label": label}).to_string());
        jsonl.push('\n');
    }
    write_atomic(&corpus_path, &[jsonl.as_bytes()])?;
    let dev = device(a.device)?;
    let pb = spinner(&format!("loading {}", a.model));
    let lm = loader::open(&a.model, &dev, precision_of(a.precision))?;
    pb.finish_and_clear();
    let layer = layer_for(&lm.name, a.layer)?;
    let texts: Vec<String> = corpus.iter().map(|(_, t, _)| t.clone()).collect();
    let pb = bar(
        texts.len() as u64,
        &format!("capturing {} L{layer}", lm.name),
    );
    let start = Instant::now();
    let captured = capture(
        &lm.model,
        &lm.tokenizer,
        &texts,
        &CaptureOptions {
            layer,
            max_tokens: a.max_tokens,
            batch_size: a.batch,
            mean_skips_bos: true,
        },
        &mut |done| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    let acts = Matrix::new(texts.len(), captured.hidden, captured.mean);
    let groups: Vec<Vec<usize>> = labels
        .iter()
        .map(|l| {
            corpus
                .iter()
                .enumerate()
                .filter(|(_, (_, _, x))| x.as_ref() == Some(l))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    let dirs = concept_directions(&acts, &groups)?;
    let meta = ConceptDirectionsMeta {
        space: Space {
            model: lm.name.clone(),
            layer: Some(layer as u32),
            d: captured.hidden,
        },
        pooling: "mean-no-bos".into(),
        labels: labels.clone(),
        groups: groups
            .iter()
            .map(|g| g.iter().map(|&i| corpus[i].0.clone()).collect())
            .collect(),
        background: corpus
            .iter()
            .filter(|(_, _, l)| l.is_none())
            .map(|(id, _, _)| id.clone())
            .collect(),
        corpus: corpus_ref(&corpus_path)?,
    };
    artifact::write(
        &a.output,
        Body::ConceptDirections(meta),
        &created_by(),
        avb_core::safetensors::Dtype::F32,
        &[NamedTensor {
            name: "features",
            shape: vec![dirs.rows, dirs.cols],
            values: &dirs.data,
        }],
    )?;
    println!(
        "wrote {}: {} labelled directions of {} L{layer} from {} texts ({:.1} s); texts in {}",
        a.output.display(),
        labels.len(),
        lm.name,
        texts.len(),
        start.elapsed().as_secs_f64(),
        corpus_path.display()
    );
    Ok(())
}

fn precision_of(p: PrecisionArg) -> avb_runtime::Precision {
    match p {
        PrecisionArg::F32 => avb_runtime::Precision::F32,
        PrecisionArg::Q8 => avb_runtime::Precision::Q8,
        PrecisionArg::Q4 => avb_runtime::Precision::Q4,
    }
}

// ---------------- explain ----------------

#[derive(clap::Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Features of the source model: an SAELens directory, a direction file, a concept_directions or
    /// mapped_features artifact.
    #[arg(long)]
    pub features: PathBuf,
    /// Only these feature rows (e.g. 0..45 or 3,7,9); default all.
    #[arg(long)]
    pub ids: Option<String>,
    /// Comma-separated: native, cross, cross-washout, random-native, random-cross, random-cross-washout.
    #[arg(
        long,
        default_value = "native,cross,cross-washout,random-native,random-cross,random-cross-washout"
    )]
    pub conditions: String,
    /// The source model's verbalizer (native conditions): an AV checkpoint directory, a sidecar/profile .yaml,
    /// or a model name with a shipped profile.
    #[arg(long)]
    pub source_av: Option<String>,
    /// The target model's verbalizer (cross conditions).
    #[arg(long)]
    pub target_av: Option<String>,
    /// Ridge map artifact from the features' space to the target AV's.
    #[arg(long)]
    pub map: Option<PathBuf>,
    /// Washout artifact of the target AV's space.
    #[arg(long)]
    pub washout: Option<PathBuf>,
    /// Washout weights w for the cross-washout conditions (comma-separated; a sweep).
    #[arg(long, default_value = "1")]
    pub washout_weights: String,
    /// Random-direction controls per random condition (default: as many as features).
    #[arg(long)]
    pub n_random: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub random_seed: u64,
    /// 0 = greedy (reproducible; the published examples); else sampling at this temperature with --top-p.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Default: the sidecar's (200 for trained AVs).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Explanations decoded at once; finished ones' rows take the next vectors while the others go on.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// JSONL output; an existing file from the same settings is resumed.
    #[arg(short, long)]
    pub output: PathBuf,
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(f)
        .collect()
}

fn parse_ids(s: &str, n: usize) -> Result<Vec<usize>> {
    let bad = || {
        AvbError::Invalid(format!(
            "--ids `{s}`: expected A..B or a comma-separated list of rows"
        ))
    };
    let ids: Vec<usize> = if let Some((a, b)) = s.split_once("..") {
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if b > n || a > b {
            return Err(AvbError::Invalid(format!(
                "--ids {s}: the source has features 0..{n}"
            )));
        }
        (a..b).collect()
    } else {
        parse_list(s, |x| x.parse().map_err(|_| bad()))?
    };
    if let Some(i) = ids.iter().find(|&&i| i >= n) {
        return Err(AvbError::Invalid(format!(
            "feature row {i} does not exist (the source has {n})"
        )));
    }
    Ok(ids)
}

fn file_ref(path: &Path) -> Result<FileRef> {
    Ok(FileRef {
        file: file_name(path),
        sha256: file_sha256(path)?,
    })
}

/// Features (selected rows), map and washout of an explanation run, checked against each other.
pub(crate) struct ExplainInputs {
    pub feats: FeatureSource,
    pub features: Vec<Feature>,
    pub map: Option<(AffineMap, RidgeMapMeta, FileRef)>,
    pub washout: Option<(Vec<f32>, WashoutMeta, FileRef)>,
}

pub(crate) fn load_inputs(
    features_path: &Path,
    ids: Option<&str>,
    map_path: Option<&Path>,
    washout_path: Option<&Path>,
) -> Result<ExplainInputs> {
    let feats = FeatureSource::open(features_path, None)?;
    let rows = match ids {
        Some(s) => parse_ids(s, feats.len())?,
        None => (0..feats.len()).collect(),
    };
    let features: Vec<Feature> = rows
        .iter()
        .map(|&i| {
            Ok(Feature {
                id: feats.id(i).to_string(),
                label: feats.label(i).map(str::to_string),
                vector: feats.row(i)?,
            })
        })
        .collect::<Result<_>>()?;
    let map = match map_path {
        Some(p) => {
            let art = open_kind(p, "ridge_map")?;
            let Body::RidgeMap(mm) = art.meta.body.clone() else {
                unreachable!("open_kind checked the kind")
            };
            if mm.source.d != feats.d() {
                return Err(AvbError::dimension(
                    format!("features {}", features_path.display()),
                    format!(
                        "rows of d = {} but the map {} reads d = {}",
                        feats.d(),
                        p.display(),
                        mm.source.d
                    ),
                    format!(
                        "use a map fitted from {} or features from that space",
                        Space::to_string(&mm.source)
                    ),
                ));
            }
            if let Some(space) = &feats.space {
                if !Space::same_site(space, &mm.source) {
                    return Err(AvbError::Invalid(format!(
                        "features live at {} but the map starts from {}; use a map fitted from the features' model and layer",
                        Space::to_string(space),
                        Space::to_string(&mm.source)
                    )));
                }
            }
            let weight = art.read_matrix("weight")?;
            let (_, bias) = art.read_tensor("bias")?;
            Some((AffineMap { weight, bias }, mm, file_ref(p)?))
        }
        None => None,
    };
    let washout = match washout_path {
        Some(p) => {
            let art: Artifact = open_kind(p, "washout")?;
            let Body::Washout(wm) = art.meta.body.clone() else {
                unreachable!("open_kind checked the kind")
            };
            if let Some((_, mm, _)) = &map {
                check_washout_for_map(&wm.space, &mm.target)?;
            }
            let (_, b) = art.read_tensor("washout")?;
            Some((b, wm, file_ref(p)?))
        }
        None => None,
    };
    Ok(ExplainInputs {
        feats,
        features,
        map,
        washout,
    })
}

pub fn explain_cmd(a: ExplainArgs) -> Result<()> {
    if a.max_new_tokens == Some(0) {
        return Err(AvbError::Invalid(
            "--max-new-tokens 0 would write empty explanations; leave it out for the verbalizer's own budget".into(),
        ));
    }
    let conditions = parse_list(&a.conditions, Condition::parse)?;
    let weights = parse_list(&a.washout_weights, |w| {
        w.parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| AvbError::Invalid(format!("washout weight `{w}` is not a number >= 0")))
    })?;
    let ExplainInputs {
        feats,
        features,
        map,
        washout,
    } = load_inputs(
        &a.features,
        a.ids.as_deref(),
        a.map.as_deref(),
        a.washout.as_deref(),
    )?;
    let dev = device(a.device)?;
    let precision = precision_of(a.precision);
    let open_av = |spec: &Option<String>, role: &str| -> Result<Option<Verbalizer>> {
        let Some(spec) = spec else { return Ok(None) };
        let pb = spinner(&format!("loading the {role} verbalizer {spec}"));
        let av = Verbalizer::open(spec, &dev, precision);
        pb.finish_and_clear();
        av.map(Some)
    };
    let needs_source = conditions.iter().any(|c| c.uses_source_av());
    let needs_target = conditions.iter().any(|c| !c.uses_source_av());
    // Both verbalizers given are opened and recorded whatever the conditions, so that a later run adding
    // conditions to the same file has the same settings.
    let source_av = open_av(&a.source_av, "source")?;
    let target_av = open_av(&a.target_av, "target")?;
    if needs_source && source_av.is_none() {
        return Err(AvbError::Invalid(
            "native conditions need --source-av".into(),
        ));
    }
    if needs_target && (target_av.is_none() || map.is_none()) {
        return Err(AvbError::Invalid(
            "cross conditions need --target-av and --map".into(),
        ));
    }
    if let Some(av) = &source_av {
        let s = av.space();
        if av.meta.d_model != feats.d() {
            return Err(AvbError::dimension(
                format!("features {}", a.features.display()),
                format!(
                    "rows of d = {} but the source verbalizer {} reads d_model {}",
                    feats.d(),
                    av.lm.name,
                    av.meta.d_model
                ),
                "give the verbalizer of the features' own model",
            ));
        }
        if let Some(space) = &feats.space {
            if !Space::same_site(space, &s) {
                return Err(AvbError::Invalid(format!(
                    "features live at {} but the source verbalizer reads {}",
                    Space::to_string(space),
                    Space::to_string(&s)
                )));
            }
        }
    }
    if let (Some(av), Some((_, mm, _))) = (&target_av, &map) {
        check_map_for_verbalizer(&mm.target, &av.space())?;
    }
    let sampling = if a.temperature > 0.0 {
        Sampling::TopP {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }
    } else {
        Sampling::Greedy
    };
    let n_random = a.n_random.unwrap_or(features.len());
    let settings = Settings {
        features: file_ref(&feats.file)?,
        features_kind: feats.kind.clone(),
        source_av: source_av.as_ref().map(AvInfo::of),
        target_av: target_av.as_ref().map(AvInfo::of),
        map: map.as_ref().map(|(_, _, r)| r.clone()),
        washout: washout.as_ref().map(|(_, _, r)| r.clone()),
        sampling: if a.temperature > 0.0 {
            "top-p"
        } else {
            "greedy"
        }
        .into(),
        // Greedy decoding ignores these: recorded as 0 so they do not split otherwise equal runs.
        temperature: a.temperature.max(0.0),
        top_p: if a.temperature > 0.0 { a.top_p } else { 0.0 },
        seed: if a.temperature > 0.0 { a.seed } else { 0 },
        max_new_tokens: a.max_new_tokens.unwrap_or(0),
        n_random,
        random_seed: a.random_seed,
        precision: format!("{:?}", a.precision).to_lowercase(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    let jobs = explain::plan(&PlanInputs {
        features: &features,
        conditions: &conditions,
        map: map.as_ref().map(|(m, _, _)| m),
        washout: washout.as_ref().map(|(b, _, _)| b.as_slice()),
        washout_weights: &weights,
        n_random,
        random_seed: a.random_seed,
    })?;
    let mut writer = RecordWriter::open(&a.output, &settings)?;
    let todo: Vec<&Job> = jobs
        .iter()
        .filter(|j| !writer.done.contains(&j.key()))
        .collect();
    println!(
        "{} explanations planned, {} already in {}, {} to generate",
        jobs.len(),
        jobs.len() - todo.len(),
        a.output.display(),
        todo.len()
    );
    let pb = bar(todo.len() as u64, "explaining");
    let start = Instant::now();
    let mut tokens = 0usize;
    for (av, source_side) in [(&source_av, true), (&target_av, false)] {
        let Some(av) = av else { continue };
        let mine: Vec<&Job> = todo
            .iter()
            .copied()
            .filter(|j| j.condition.uses_source_av() == source_side)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let opts = ExplainOptions {
            max_new_tokens: a.max_new_tokens.unwrap_or(av.meta.max_new_tokens()),
            sampling: sampling.clone(),
            batch_size: a.batch,
            seeds: Some(mine.iter().map(|j| j.seed(a.seed)).collect()),
        };
        let vectors: Vec<Vec<f32>> = mine.iter().map(|j| j.vector.clone()).collect();
        av.explain(&vectors, &opts, &mut |i, e| {
            tokens += e.tokens;
            writer.write(&Record::new(mine[i], e, &settings))?;
            pb.inc(1);
            Ok(())
        })?;
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {} explanations to {} in {secs:.1} s ({:.1} generated tokens/s)",
        todo.len(),
        a.output.display(),
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

// ---------------- eval ----------------

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Explanation records from `avb explain`.
    #[arg(long)]
    pub explanations: PathBuf,
    /// Sentence embedder (registry name or sentence-transformers directory).
    #[arg(long, default_value = "minilm-l6-v2")]
    pub embedder: String,
    #[arg(long, default_value_t = 10_000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: report.md, eval.json, lift.svg, sweep.svg.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Title of the report.
    #[arg(long, default_value = "Explanation evaluation")]
    pub title: String,
    /// AR checkpoint of the source model's NLA pair: scores the native explanations by reconstruction.
    #[arg(long)]
    pub source_ar: Option<PathBuf>,
    /// AR checkpoint of the target model's NLA pair: scores the cross explanations by reconstruction.
    #[arg(long)]
    pub target_ar: Option<PathBuf>,
    /// The features, map and washout the explanations were made from (for AR scores: the verbalized vectors
    /// are rebuilt from them and checked against the hashes in the records).
    #[arg(long)]
    pub features: Option<PathBuf>,
    #[arg(long)]
    pub map: Option<PathBuf>,
    #[arg(long)]
    pub washout: Option<PathBuf>,
}

/// Rebuild the verbalized vectors and add AR reconstruction scores for the arms an AR is given for.
fn ar_scores_cmd(a: &EvalArgs, records: &[Record], ev: &mut Evaluation) -> Result<()> {
    let Some(settings) = records.first().map(|r| &r.settings) else {
        return Ok(());
    };
    let features = a.features.as_deref().ok_or_else(|| {
        AvbError::Invalid("AR scores need --features (and --map / --washout for cross conditions): the vectors that were verbalized".into())
    })?;
    let inputs = load_inputs(features, None, a.map.as_deref(), a.washout.as_deref())?;
    let same = |given: Option<&FileRef>, recorded: Option<&FileRef>, what: &str| -> Result<()> {
        match (given, recorded) {
            (Some(g), Some(r)) if g.sha256 != r.sha256 => Err(AvbError::Invalid(format!(
                "the {what} given ({}, sha256 {}) is not the one the explanations were made from ({}, sha256 {})",
                g.file, g.sha256, r.file, r.sha256
            ))),
            _ => Ok(()),
        }
    };
    same(
        Some(&file_ref(&inputs.feats.file)?),
        Some(&settings.features),
        "features file",
    )?;
    same(
        inputs.map.as_ref().map(|m| &m.2),
        settings.map.as_ref(),
        "map",
    )?;
    same(
        inputs.washout.as_ref().map(|w| &w.2),
        settings.washout.as_ref(),
        "washout",
    )?;
    // Only the conditions an AR was given for: the others may need inputs that were not passed.
    let mut conditions: Vec<Condition> = records
        .iter()
        .map(|r| r.condition)
        .filter(|c| {
            !c.is_random()
                && if c.uses_source_av() {
                    a.source_ar.is_some()
                } else {
                    a.target_ar.is_some()
                }
        })
        .collect();
    conditions.sort();
    conditions.dedup();
    let mut weights: Vec<f64> = records.iter().filter_map(|r| r.washout_weight).collect();
    weights.sort_by(f64::total_cmp);
    weights.dedup();
    let jobs = explain::plan(&PlanInputs {
        features: &inputs.features,
        conditions: &conditions,
        map: inputs.map.as_ref().map(|m| &m.0),
        washout: inputs.washout.as_ref().map(|w| w.0.as_slice()),
        washout_weights: &weights,
        n_random: settings.n_random,
        random_seed: settings.random_seed,
    })?;
    let vectors: std::collections::BTreeMap<String, &Vec<f32>> =
        jobs.iter().map(|j| (j.key(), &j.vector)).collect();
    let dev = avb_runtime::Device::flex();
    let open = |p: &Option<PathBuf>| -> Result<Option<Reconstructor>> {
        p.as_deref()
            .map(|p| Reconstructor::open(p, &dev, avb_runtime::Precision::F32))
            .transpose()
    };
    let (source_ar, target_ar) = (open(&a.source_ar)?, open(&a.target_ar)?);
    let opts = EvalOptions {
        ci_level: 0.95,
        resamples: a.bootstrap,
        seed: a.seed,
    };
    let arms: Vec<Arm> = ev
        .arms
        .iter()
        .map(|(arm, _)| arm.clone())
        .filter(|arm| !arm.condition.is_random())
        .collect();
    for arm in arms {
        let ar = if arm.condition.uses_source_av() {
            &source_ar
        } else {
            &target_ar
        };
        let Some(ar) = ar else { continue };
        let (features, recs): (Vec<usize>, Vec<&Record>) = ev
            .feature_ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| {
                records
                    .iter()
                    .find(|r| {
                        &r.feature_id == id
                            && r.condition == arm.condition
                            && r.washout_weight == arm.washout_weight
                    })
                    .map(|r| (i, r))
            })
            .unzip();
        let mut gold = Vec::new();
        for r in &recs {
            let v = vectors.get(&r.key()).ok_or_else(|| {
                AvbError::Invalid(format!(
                    "no vector for {} {} (were the explanations made from these files?)",
                    r.condition.name(),
                    r.feature_id
                ))
            })?;
            gold.extend_from_slice(v);
        }
        let texts: Vec<String> = recs.iter().map(|r| r.explanation.clone()).collect();
        let pb = spinner(&format!("AR reconstruction of {}", arm.name()));
        let pred = ar.predict(&texts, 16)?;
        pb.finish_and_clear();
        let gold = Matrix::new(recs.len(), pred.cols, gold);
        let scores = ar_scores(&pred, &gold, ar.meta.mse_scale())?;
        eval::add_ar_scores(ev, &arm, &features, &scores, &opts);
    }
    Ok(())
}

fn open_embedder(spec: &str) -> Result<SentenceEmbedder> {
    let (_, path) = loader::resolve(spec)?;
    SentenceEmbedder::load(&path, &avb_runtime::Device::flex())
}

pub fn evaluate_file(
    path: &Path,
    embedder: &str,
    bootstrap: usize,
    seed: u64,
) -> Result<(Vec<Record>, Evaluation)> {
    let (records, torn) = explain::read_records(path)?;
    if torn {
        eprintln!(
            "note: the last line of {} is torn (an interrupted run); it is left out",
            path.display()
        );
    }
    let emb = open_embedder(embedder)?;
    let pb = spinner("embedding explanations (MiniLM)");
    let evaluation = eval::evaluate(
        &records,
        &mut |texts| emb.embed(texts, 32, &mut |_| {}),
        &EvalOptions {
            ci_level: 0.95,
            resamples: bootstrap,
            seed,
        },
    )?;
    pb.finish_and_clear();
    Ok((records, evaluation))
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let (records, mut ev) = evaluate_file(&a.explanations, &a.embedder, a.bootstrap, a.seed)?;
    if a.source_ar.is_some() || a.target_ar.is_some() {
        ar_scores_cmd(&a, &records, &mut ev)?;
    }
    std::fs::create_dir_all(&a.output).map_err(|e| AvbError::io(&a.output, e))?;
    let report = write_report(&a.output, &a.title, "", &records, &ev, &a.explanations)?;
    print!("{}", summary_table(&ev));
    println!("wrote {}", report.display());
    Ok(())
}

fn fmt_p(p: f64) -> String {
    if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

const HEADLINE: [&str; 8] = [
    "lift",
    "control-lift",
    "label-cosine",
    "label-cosine-last",
    "label-lift",
    "label-control-lift",
    "ar-cosine",
    "ar-fve",
];

fn summary_table(ev: &Evaluation) -> String {
    let mut s = String::from(
        "| condition | metric | n | mean | 95% CI (t) | 95% CI (bootstrap BCa) | p (t) | p (Wilcoxon) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for metric in HEADLINE {
        for sc in ev.scores.iter().filter(|s| s.metric == metric) {
            let m = &sc.summary;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:+.3} | [{:+.3}, {:+.3}] | [{:+.3}, {:+.3}] | {} | {} |",
                sc.arm.name(),
                sc.metric,
                m.n,
                m.mean,
                m.t_ci.0,
                m.t_ci.1,
                m.bootstrap.bca.0,
                m.bootstrap.bca.1,
                fmt_p(m.ttest.pvalue),
                fmt_p(m.wilcoxon.pvalue)
            );
        }
    }
    s
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// report.md, eval.json and the plots in `dir`; `preamble` goes after the title (the experiment's setup).
pub fn write_report(
    dir: &Path,
    title: &str,
    preamble: &str,
    records: &[Record],
    ev: &Evaluation,
    source: &Path,
) -> Result<PathBuf> {
    let json = serde_json::to_string_pretty(ev)
        .map_err(|e| AvbError::Invalid(format!("cannot serialize the evaluation: {e}")))?;
    write_atomic(&dir.join("eval.json"), &[json.as_bytes()])?;
    let lift_rows: Vec<&Scored> = ev
        .scores
        .iter()
        .filter(|s| s.metric == "lift" || s.metric == "control-lift")
        .collect();
    write_atomic(
        &dir.join("lift.svg"),
        &[eval::strip_plot_svg(
            "Feature-specific lift per feature (red: mean and 95% t CI)",
            &lift_rows,
        )
        .as_bytes()],
    )?;
    let label_rows: Vec<&Scored> = ev
        .scores
        .iter()
        .filter(|s| s.metric == "label-cosine")
        .collect();
    write_atomic(
        &dir.join("label_cosine.svg"),
        &[eval::strip_plot_svg(
            "Cosine between explanation and ground-truth label (MiniLM)",
            &label_rows,
        )
        .as_bytes()],
    )?;
    let mut series = Vec::new();
    for metric in ["lift", "control-lift", "label-cosine", "label-lift"] {
        let mut pts: Vec<(f64, &avb_core::stats::Summary)> = ev
            .scores
            .iter()
            .filter(|s| s.metric == metric)
            .filter_map(|s| match s.arm.condition {
                Condition::Cross => Some((0.0, &s.summary)),
                Condition::CrossWashout => s.arm.washout_weight.map(|w| (w, &s.summary)),
                _ => None,
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.len() >= 2 {
            series.push((metric.to_string(), pts));
        }
    }
    let sweep = !series.is_empty();
    if sweep {
        write_atomic(
            &dir.join("sweep.svg"),
            &[eval::sweep_svg("Washout-weight sweep (mean and 95% t CI)", &series).as_bytes()],
        )?;
    }
    let mut md = String::new();
    let _ = writeln!(md, "# {title}\n");
    md.push_str(preamble);
    let _ = writeln!(
        md,
        "Explanations: `{}` ({} records). Embedder: all-MiniLM-L6-v2 (mean pooling, L2-normalised). CIs: 95%, Student t and bootstrap BCa; p-values two-sided (one-sample t-test, Wilcoxon signed-rank).\n",
        file_name(source),
        records.len()
    );
    let _ = writeln!(md, "| condition | records |\n| --- | --- |");
    for (arm, n) in &ev.arms {
        let _ = writeln!(md, "| {} | {n} |", arm.name());
    }
    let _ = writeln!(
        md,
        "\n## Scores\n\n`lift`: cos(C_i, B_i) - mean over j != i of cos(C_i, B_j), B = native explanations. `control-lift`: cos(C_i, B_i) - mean over random-direction controls R of cos(R, B_i). `label-cosine`: cos(explanation, label); `-last`: the last paragraph only. `label-lift`: the lift formula with labels in place of native explanations; `label-control-lift`: against the random controls' label cosines. `ar-cosine` / `ar-fve` (when an AR is given): the AR's reconstruction of the explanation against the verbalized vector.\n"
    );
    md.push_str(&summary_table(ev));
    for (arm, metric, why) in &ev.skipped {
        let _ = writeln!(md, "\n- not summarised: {arm} · {metric}: {why}");
    }
    md.push_str("\n![lift](lift.svg)\n\n![label cosine](label_cosine.svg)\n");
    if sweep {
        md.push_str("\n![washout sweep](sweep.svg)\n");
    }
    // Per-feature table.
    let arms_shown: Vec<&Arm> = ev
        .arms
        .iter()
        .map(|(a, _)| a)
        .filter(|a| !a.condition.is_random())
        .collect();
    let _ = writeln!(md, "\n## Per feature\n");
    let mut header = String::from("| feature | label |");
    let mut rule = String::from("| --- | --- |");
    for arm in &arms_shown {
        if arm.condition != Condition::Native {
            let _ = write!(header, " lift {} |", arm.name());
            rule.push_str(" --- |");
        }
        let _ = write!(header, " label cos {} |", arm.name());
        rule.push_str(" --- |");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for (i, id) in ev.feature_ids.iter().enumerate() {
        let _ = write!(md, "| {id} | {} |", ev.labels[i].as_deref().unwrap_or(""));
        for arm in &arms_shown {
            let cell = |metric: &str| {
                ev.find(arm, metric)
                    .and_then(|s| s.value_of(i))
                    .map_or(String::new(), |v| format!("{v:+.3}"))
            };
            if arm.condition != Condition::Native {
                let _ = write!(md, " {} |", cell("lift"));
            }
            let _ = write!(md, " {} |", cell("label-cosine"));
        }
        md.push('\n');
    }
    // Examples.
    let _ = writeln!(md, "\n## Example explanations (first 10 per condition)\n");
    for (arm, _) in &ev.arms {
        let _ = writeln!(
            md,
            "### {}\n\n| feature | label | explanation |\n| --- | --- | --- |",
            arm.name()
        );
        for r in records
            .iter()
            .filter(|r| r.condition == arm.condition && r.washout_weight == arm.washout_weight)
            .take(10)
        {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                r.feature_id,
                r.label.as_deref().unwrap_or(""),
                one_line(&r.explanation, 160)
            );
        }
        md.push('\n');
    }
    let path = dir.join("report.md");
    write_atomic(&path, &[md.as_bytes()])?;
    Ok(path)
}

// ---------------- experiment ----------------

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Source model (its features are explained): a registry name.
    #[arg(long)]
    pub source: String,
    /// Target model (its verbalizer explains the mapped features).
    #[arg(long)]
    pub target: String,
    #[arg(long)]
    pub source_layer: Option<usize>,
    #[arg(long)]
    pub target_layer: Option<usize>,
    /// Verbalizers (default: the shipped zero-shot profiles of the two models).
    #[arg(long)]
    pub source_av: Option<String>,
    #[arg(long)]
    pub target_av: Option<String>,
    /// Sentences of the embedded Wikipedia corpus the map is fitted on (20% held out).
    #[arg(long, default_value_t = 1000)]
    pub map_sentences: usize,
    /// Ridge penalty; default: chosen by 5-fold CV.
    #[arg(long)]
    pub lambda: Option<f64>,
    #[arg(long, default_value = "0.5,1,2")]
    pub washout_weights: String,
    /// Concept directions explained (the first N labelled groups).
    #[arg(long, default_value_t = 45)]
    pub n_features: usize,
    /// Explanations decoded at once (finished rows refilled straight away).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Working directory for the artifacts (captures, map, washout, directions, explanations).
    #[arg(long)]
    pub work: PathBuf,
    /// Report directory (report.md + plots + eval.json); default docs/results/<source>__<target>.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Whether the artifact at `path` exists, verifies, and satisfies `same_inputs`.
fn reusable(path: &Path, same_inputs: impl Fn(&Body) -> bool) -> bool {
    Artifact::open(path)
        .ok()
        .filter(|art| art.verify().is_ok())
        .is_some_and(|art| same_inputs(&art.meta.body))
}

/// The payload hash an artifact is referred to by (what derived artifacts record as their input).
fn payload_sha256(path: &Path) -> Option<String> {
    Artifact::open(path).ok().map(|a| a.input_ref().sha256)
}

fn reusable_capture(path: &Path, model: &str, layer: usize, corpus: &Path) -> bool {
    reusable(path, |b| match b {
        Body::ActivationSet(m) => {
            m.space.model == model
                && m.space.layer == Some(layer as u32)
                && corpus_ref(corpus).is_ok_and(|c| c.sha256 == m.corpus.sha256)
        }
        _ => false,
    })
}

pub fn experiment_cmd(a: ExperimentArgs) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&a.work).map_err(|e| AvbError::io(&a.work, e))?;
    let src_layer = layer_for(&a.source, a.source_layer)?;
    let tgt_layer = layer_for(&a.target, a.target_layer)?;
    let pair = format!("{}__{}", a.source, a.target);
    let report_dir = a
        .report
        .clone()
        .unwrap_or_else(|| PathBuf::from("docs/results").join(&pair));
    let w = |name: &str| a.work.join(name);
    let map_corpus = w("map_corpus.jsonl");
    let lines: Vec<&str> = WIKI_CORPUS.lines().take(a.map_sentences).collect();
    write_atomic(&map_corpus, &[(lines.join("\n") + "\n").as_bytes()])?;
    let wash_corpus = w("washout_corpus.jsonl");
    write_atomic(&wash_corpus, &[WASHOUT_CORPUS.as_bytes()])?;
    let capture_args =
        |model: &str, layer: usize, corpus: &Path, pooling: &str, out: PathBuf| CaptureArgs {
            model: model.to_string(),
            layer: Some(layer),
            corpus: corpus.to_path_buf(),
            pooling: pooling.to_string(),
            mean_skips_bos: pooling == "mean",
            max_tokens: 64,
            batch: a.batch,
            limit: None,
            device: a.device,
            precision: PrecisionArg::F32,
            dtype: DtypeArg::F32,
            output: out,
        };
    let step = |name: &str| println!("\n== {name} ({:.0} s)", started.elapsed().as_secs_f64());
    let (src_caps, tgt_caps) = (w("source_map.safetensors"), w("target_map.safetensors"));
    // A step's output is reused only when it was made from the same inputs (model, layer, corpus or upstream
    // artifact hashes): a rerun with other settings in the same work directory redoes what they change.
    let mut reused: Vec<&str> = Vec::new();
    let mut keep = |ok: bool, name: &'static str| {
        if ok {
            reused.push(name);
        }
        ok
    };
    if !keep(
        reusable_capture(&src_caps, &a.source, src_layer, &map_corpus),
        "source capture",
    ) {
        step("capture: source model on the map corpus");
        runtime_cmds::capture_cmd(capture_args(
            &a.source,
            src_layer,
            &map_corpus,
            "mean",
            src_caps.clone(),
        ))?;
    }
    if !keep(
        reusable_capture(&tgt_caps, &a.target, tgt_layer, &map_corpus),
        "target capture",
    ) {
        step("capture: target model on the map corpus");
        runtime_cmds::capture_cmd(capture_args(
            &a.target,
            tgt_layer,
            &map_corpus,
            "mean",
            tgt_caps.clone(),
        ))?;
    }
    let map_path = w("map.safetensors");
    let map_reusable = reusable(&map_path, |b| match b {
        Body::RidgeMap(m) => {
            let same_input = |key: &str, p: &Path| {
                m.inputs
                    .get(key)
                    .is_some_and(|r| payload_sha256(p).is_some_and(|h| h == r.sha256))
            };
            let same_lambda = match (a.lambda, &m.lambda_selection) {
                (Some(l), Some(sel)) => sel.mode == "given" && m.lambda == Some(l),
                (None, Some(sel)) => sel.mode == "cv",
                _ => false,
            };
            same_input("source", &src_caps) && same_input("target", &tgt_caps) && same_lambda
        }
        _ => false,
    });
    if !keep(map_reusable, "map") {
        step("fit-map (ridge, 20% held out)");
        commands::fit_map(FitMapArgs {
            lambda: a.lambda,
            cv_folds: a.lambda.is_none().then_some(5),
            ..FitMapArgs::cv_ridge(src_caps, tgt_caps, map_path.clone())
        })?;
    }
    let wash_caps = w("target_washout_last.safetensors");
    if !keep(
        reusable_capture(&wash_caps, &a.target, tgt_layer, &wash_corpus),
        "washout capture",
    ) {
        step("capture: target model, last token of 100 multilingual sentences");
        runtime_cmds::capture_cmd(capture_args(
            &a.target,
            tgt_layer,
            &wash_corpus,
            "last",
            wash_caps.clone(),
        ))?;
    }
    let wash_path = w("washout.safetensors");
    let wash_reusable = reusable(&wash_path, |b| match b {
        Body::Washout(m) => payload_sha256(&wash_caps).is_some_and(|h| h == m.input.sha256),
        _ => false,
    });
    if !keep(wash_reusable, "washout") {
        step("washout");
        commands::washout(WashoutArgs {
            activations: wash_caps,
            output: wash_path.clone(),
            site: Default::default(),
            json: false,
        })?;
    }
    let dirs_path = w("directions.safetensors");
    let dirs_reusable = reusable(&dirs_path, |b| match b {
        Body::ConceptDirections(m) => {
            m.space.model == a.source && m.space.layer == Some(src_layer as u32)
        }
        _ => false,
    });
    if !keep(dirs_reusable, "directions") {
        step("directions: labelled concept directions of the source model");
        directions_cmd(DirectionsArgs {
            model: a.source.clone(),
            layer: Some(src_layer),
            groups: "wiki".into(),
            per_group: 16,
            min_group: 12,
            background: 200,
            seed: 0,
            max_tokens: 48,
            batch: a.batch,
            device: a.device,
            precision: PrecisionArg::F32,
            output: dirs_path.clone(),
        })?;
    }
    let explanations = w("explanations.jsonl");
    let explained_before = explain::read_records(&explanations).map_or(0, |(r, _)| r.len());
    step("explain");
    explain_cmd(ExplainArgs {
        features: dirs_path,
        ids: Some(format!("0..{}", a.n_features)),
        conditions: Condition::ALL.map(Condition::name).join(","),
        source_av: Some(a.source_av.clone().unwrap_or_else(|| a.source.clone())),
        target_av: Some(a.target_av.clone().unwrap_or_else(|| a.target.clone())),
        map: Some(map_path.clone()),
        washout: Some(wash_path.clone()),
        washout_weights: a.washout_weights.clone(),
        n_random: None,
        random_seed: 7,
        temperature: 0.0,
        top_p: 0.9,
        seed: 0,
        max_new_tokens: None,
        batch: a.batch,
        device: a.device,
        precision: PrecisionArg::F32,
        output: explanations.clone(),
    })?;
    step("eval");
    let (records, ev) = evaluate_file(&explanations, "minilm-l6-v2", 10_000, 0)?;
    let map_art = Artifact::open(&map_path)?;
    let Body::RidgeMap(mm) = &map_art.meta.body else {
        unreachable!("fit-map wrote a ridge map")
    };
    let mut pre = String::new();
    let _ = writeln!(
        pre,
        "Generated by `avb experiment --source {} --target {} --work <dir>` (avb {}, {:?} backend, {:.0} s in this run{}).\n",
        a.source,
        a.target,
        env!("CARGO_PKG_VERSION"),
        a.device,
        started.elapsed().as_secs_f64(),
        if reused.is_empty() {
            String::new()
        } else {
            format!(
                "; reused from the work directory, made from the same inputs: {}",
                reused.join(", ")
            )
        }
    );
    if explained_before > 0 {
        let _ = writeln!(
            pre,
            "{explained_before} of the explanations were written by an earlier run with the same settings (resumed).\n"
        );
    }
    let _ = writeln!(pre, "## Setup\n");
    let _ = writeln!(
        pre,
        "- Source: {} block {src_layer}; target: {} block {tgt_layer} (registry layers, about 70% depth).",
        a.source, a.target
    );
    if let Some(h) = &mm.heldout {
        let _ = writeln!(
            pre,
            "- Ridge map on {} Wikipedia sentences (mean-pooled, BOS left out): lambda {}, n_train {}, n_holdout {}; held-out mean cosine **{:.3}** (centred {:.3}; predicting the train mean: {:.3}), R^2 (variance-weighted) {:.3}.",
            a.map_sentences,
            mm.lambda.map_or("?".into(), |l| format!("{l:.3e}")),
            mm.split.n_train,
            mm.split.n_holdout,
            h.mean_cosine,
            h.mean_centered_cosine,
            h.mean_baseline_cosine,
            h.r2_variance_weighted
        );
    }
    let _ = writeln!(
        pre,
        "- Washout: mean L2-normalised last-token activation of the target on 100 multilingual sentences; weights {}.",
        a.washout_weights
    );
    let _ = writeln!(
        pre,
        "- Features: {} labelled concept directions of the source model (Wikipedia groups of concepts.json, 16 lead sentences each, mean minus corpus mean), so every feature has a ground-truth label; random controls: as many seeded random unit directions of the source space, through the same path.",
        ev.feature_ids.len()
    );
    if let Some(s) = records.first().map(|r| &r.settings) {
        for (side, av) in [("source", &s.source_av), ("target", &s.target_av)] {
            if let Some(av) = av {
                let _ = writeln!(
                    pre,
                    "- {side} verbalizer: {} ({}), injection at the input of block {}, scale {:.2}{}; greedy decoding.",
                    av.model,
                    av.sidecar,
                    av.injection_layer,
                    av.injection_scale.unwrap_or(f64::NAN),
                    if av.zero_shot { ", zero-shot profile (no trained AV exists for this model)" } else { "" }
                );
            }
        }
    }
    pre.push('\n');
    std::fs::create_dir_all(&report_dir).map_err(|e| AvbError::io(&report_dir, e))?;
    let title = format!(
        "Cross-model explanations: {} features explained by {}",
        a.source, a.target
    );
    let report = write_report(&report_dir, &title, &pre, &records, &ev, &explanations)?;
    std::fs::copy(&explanations, report_dir.join("explanations.jsonl"))
        .map_err(|e| AvbError::io(&report_dir, e))?;
    print!("{}", summary_table(&ev));
    println!(
        "wrote {} ({:.0} s)",
        report.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
