//! `avb bench decode`: greedy (or sampled) generation with random weights of a real shape (the released AVs' base models, or
//! the small real models), against Hugging Face transformers on the same shape in the same run, with the fraction
//! of the device's bandwidth ceiling (copy bandwidth measured in the same run). Prints a Markdown table.

use crate::runtime_cmds::{device, DeviceArg, PrecisionArg};
use avb_core::rng::SplitMix64;
use avb_core::{AvbError, Result};
use avb_runtime::generate::Decoder;
use avb_runtime::model::copy_bandwidth;
use avb_runtime::{generate, Control, GenerateOptions, Input, Model, ModelConfig, Sampling};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The shapes `--shape` names: Hugging Face config.json bodies.
const SHAPES: &str = include_str!("../../avb-runtime/shapes.json");

#[derive(clap::Args)]
pub struct DecodeBenchArgs {
    /// A shape from crates/avb-runtime/shapes.json: qwen2.5-7b, gemma-3-12b, gemma-3-27b, llama-3.3-70b,
    /// smollm2-135m, qwen2.5-coder-0.5b, gemma-3-270m.
    #[arg(long)]
    pub shape: String,
    /// Batch sizes (sequences decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// New tokens per sequence (no stop tokens: every sequence runs the whole budget).
    #[arg(long, default_value_t = 128)]
    pub new: usize,
    #[arg(long, value_enum, default_value = "q8")]
    pub precision: PrecisionArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Timed runs per batch size (median reported), after one whole warm-up run.
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Reference script (transformers) run on the same shape; `none` skips it.
    #[arg(long, default_value = "tests/scripts/bench_decode_reference.py")]
    pub reference: String,
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The reference's device (cuda or cpu); by default cuda for GPU backends, cpu for the CPU one.
    #[arg(long)]
    pub reference_device: Option<String>,
    /// The reference's weight dtype: bf16 (the GPU anchor) or f32 (the CPU one).
    #[arg(long)]
    pub reference_dtype: Option<String>,
    /// Also explain 4 x batch sequences whose lengths vary (uniform in new/4..=new, as explanations end at
    /// their own stop) for each batch size of at least 2: in fixed chunks, then with finished rows refilled.
    #[arg(long)]
    pub varied: bool,
    /// 0: greedy decoding; else temperature + top-p sampling at this temperature (on the device where the kernels
    /// apply, else from logits read back), the reference sampling the same way.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Launch every step's kernels instead of recording a step once and replaying it (CubeCL graphs).
    #[arg(long)]
    pub no_graphs: bool,
    /// Also write the table, with the command and the machine, to this Markdown file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

fn shape_config(name: &str) -> Result<(serde_json::Value, ModelConfig)> {
    let shapes: serde_json::Value =
        serde_json::from_str(SHAPES).map_err(|e| AvbError::Invalid(format!("shapes.json: {e}")))?;
    let body = shapes
        .get(name)
        .filter(|_| !name.starts_with('_'))
        .ok_or_else(|| {
            let names: Vec<&str> = shapes
                .as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .filter(|k| !k.starts_with('_'))
                .map(String::as_str)
                .collect();
            AvbError::Invalid(format!(
                "unknown shape `{name}`; known: {}",
                names.join(", ")
            ))
        })?;
    let config = ModelConfig::from_hf(body, Path::new("shapes.json"))?;
    Ok((body.clone(), config))
}

/// Bytes of weights one decoding step reads (every projection and the LM head once, whatever the batch).
fn weight_bytes(c: &ModelConfig, bits: Option<u32>) -> f64 {
    let head = (c.hidden_size * c.vocab_size) as f64;
    let weights = c.num_layers as f64 * c.block_projection_weights() as f64 + head;
    // Compact weights carry one f32 scale per block of 32.
    let per_weight = match bits {
        Some(b) => b as f64 / 8.0 + 4.0 / 32.0,
        None => 4.0,
    };
    weights * per_weight
}

/// Bytes of keys and values one step reads for `batch` rows at the cache's capacity (attention spans it).
fn kv_bytes(c: &ModelConfig, batch: usize, capacity: usize) -> f64 {
    (2 * c.num_layers * c.num_kv_heads * c.head_dim * batch * capacity * 4) as f64
}

/// Host memory bandwidth (bytes read + written per second) of copying 256 MiB, best of five.
fn host_copy_bandwidth() -> f64 {
    let n = 1usize << 28;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * n as f64 / best
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Timing {
    prefill_s: f64,
    generate_s: f64,
    /// Host seconds per step spent issuing work (the head and argmax, then the next forward pass), and seconds
    /// per step blocked on reading the chosen ids back: a step whose issuing time nears the whole step is bound
    /// by the host, not by the device.
    issue_s: f64,
    wait_s: f64,
    /// Whether the steps after the first were replayed from a recording.
    replayed: bool,
}

/// One whole generation of `new` tokens, its prefill (the decoder's start: the prompt's forward pass into the
/// cache and the first token, read back) timed apart.
fn time_batch(model: &Model, inputs: &[Input], new: usize, sampling: &Sampling) -> Result<Timing> {
    let opts = GenerateOptions {
        max_new_tokens: new,
        sampling: sampling.clone(),
        stop_ids: Vec::new(),
        row_seeds: None,
        max_batch: None,
    };
    // `generate`'s loop, timed by part.
    let t = Instant::now();
    let (mut issue, mut wait, mut steps) = (0.0, 0.0, 0usize);
    let before = model.decode_steps();
    let mut decoder = Decoder::new(model, inputs, &opts)?;
    // The first token's ids, read once here to end the prefill (the loop reads them again: a few bytes).
    if let Some(first) = decoder.readback() {
        first.read()?;
    }
    let prefill_s = t.elapsed().as_secs_f64();
    loop {
        let t0 = Instant::now();
        let Some(readback) = decoder.readback() else {
            break;
        };
        let t1 = Instant::now();
        let host = readback.read()?;
        let t2 = Instant::now();
        decoder.advance(host, &mut |_, _| Control::Continue)?;
        issue += (t1 - t0).as_secs_f64() + t2.elapsed().as_secs_f64();
        wait += (t2 - t1).as_secs_f64();
        steps += 1;
    }
    let steps = steps.max(1) as f64;
    Ok(Timing {
        prefill_s,
        generate_s: t.elapsed().as_secs_f64(),
        issue_s: issue / steps,
        wait_s: wait / steps,
        replayed: model.decode_steps().since(before).replayed > 0,
    })
}

/// Generate `inputs`, sequence i stopping after lengths[i] tokens, `batch` at a time: in fixed chunks (the next
/// chunk starts when the whole chunk is done) or with rows refilled as sequences finish (`GenerateOptions::
/// max_batch`). Returns seconds.
fn time_varied(
    model: &Model,
    inputs: &[Input],
    lengths: &[usize],
    (batch, budget): (usize, usize),
    refill: bool,
) -> Result<f64> {
    let opts = GenerateOptions {
        max_new_tokens: budget,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        row_seeds: None,
        max_batch: refill.then_some(batch),
    };
    let t = Instant::now();
    let chunk = if refill { inputs.len() } else { batch };
    for (c, part) in inputs.chunks(chunk).enumerate() {
        let mut counts = vec![0usize; part.len()];
        generate(model, part, &opts, &mut |i, _| {
            counts[i] += 1;
            if counts[i] >= lengths[c * chunk + i] {
                Control::Stop
            } else {
                Control::Continue
            }
        })?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The `--varied` table: explanations/s of fixed chunks and of refilled rows on the same sequences.
fn varied_table(
    a: &DecodeBenchArgs,
    model: &Model,
    prompts: &mut dyn FnMut(usize) -> Vec<Input>,
) -> Result<String> {
    let mut rng = SplitMix64::new(2);
    let mut table = String::from(
        "| batch | sequences | tokens | chunked s | refilled s | chunked explanations/s | refilled explanations/s | speed-up |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for &b in a.batch.iter().filter(|b| **b >= 2) {
        let n = 4 * b;
        let inputs = prompts(n);
        let lengths: Vec<usize> = (0..n)
            .map(|_| a.new / 4 + rng.below(a.new - a.new / 4 + 1))
            .map(|l| l.max(1))
            .collect();
        // Warm-up: the same cache capacity and prefill shapes of one to `b` rows, a few tokens each.
        let short: Vec<usize> = lengths.iter().map(|l| 1 + l % 3).collect();
        let shape = (b, a.new);
        eprintln!("varied lengths, batch {b}: warm-up");
        time_varied(model, &inputs[..b], &short[..b], shape, false)?;
        time_varied(model, &inputs, &short, shape, true)?;
        let chunked = time_varied(model, &inputs, &lengths, shape, false)?;
        let refilled = time_varied(model, &inputs, &lengths, shape, true)?;
        eprintln!("varied lengths, batch {b}: chunked {chunked:.2} s, refilled {refilled:.2} s");
        table.push_str(&format!(
            "| {b} | {n} | {} | {chunked:.2} | {refilled:.2} | {:.3} | {:.3} | {:.2}x |\n",
            lengths.iter().sum::<usize>(),
            n as f64 / chunked,
            n as f64 / refilled,
            chunked / refilled
        ));
    }
    Ok(table)
}

fn reference(
    a: &DecodeBenchArgs,
    body: &serde_json::Value,
    dir: &Path,
) -> Result<Option<serde_json::Value>> {
    if a.reference == "none" {
        return Ok(None);
    }
    let gpu = !matches!(a.device, DeviceArg::Cpu);
    let shapes = dir.join("shape.json");
    std::fs::write(&shapes, body.to_string()).map_err(|e| AvbError::io(&shapes, e))?;
    let batches: Vec<String> = a.batch.iter().map(usize::to_string).collect();
    let ref_device = a
        .reference_device
        .clone()
        .unwrap_or_else(|| if gpu { "cuda" } else { "cpu" }.into());
    let dtype = a
        .reference_dtype
        .clone()
        .unwrap_or_else(|| if gpu { "bf16" } else { "f32" }.into());
    eprintln!("transformers on {ref_device} ({dtype})");
    crate::bench::run_reference(
        Command::new(&a.python)
            .arg(&a.reference)
            .arg(&shapes)
            .arg(&a.shape)
            .args(["--batch", &batches.join(",")])
            .args(["--prompt", &a.prompt.to_string()])
            .args(["--new", &a.new.to_string()])
            .args(["--device", &ref_device, "--dtype", &dtype])
            .args(["--reps", &a.reps.max(1).to_string()])
            .args(["--temperature", &a.temperature.to_string()])
            .args(["--top-p", &a.top_p.to_string()]),
        "install python3 with torch and transformers, or pass --reference none",
    )
    .map(Some)
}

pub fn decode_bench(a: DecodeBenchArgs) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.new == 0 || a.prompt == 0 {
        return Err(AvbError::Invalid(
            "--batch sizes, --prompt and --new must be at least 1".into(),
        ));
    }
    let (body, config) = shape_config(&a.shape)?;
    if a.reference != "none" && !Path::new(&a.reference).exists() {
        return Err(AvbError::Invalid(format!(
            "reference script {} not found. Fix: run from the repository root, pass --reference, or --reference none.",
            a.reference
        )));
    }
    let (sampling, decoding) = match a.temperature {
        t if t > 0.0 => (
            Sampling::TopP {
                temperature: t,
                top_p: a.top_p,
                seed: 0,
            },
            format!("sampled at temperature {t}, top-p {}", a.top_p),
        ),
        _ => (Sampling::Greedy, "greedy".to_string()),
    };
    let dev = device(a.device)?;
    let precision = a.precision.precision();
    eprintln!(
        "{}: random weights on {:?} at {:?}",
        a.shape, a.device, a.precision
    );
    let t = Instant::now();
    let mut model = Model::random(config.clone(), &dev, precision, 0)?;
    model.set_graphs(!a.no_graphs);
    dev.sync()
        .map_err(|e| AvbError::Invalid(format!("device sync failed: {e:?}")))?;
    let build_s = t.elapsed().as_secs_f64();
    let bandwidth = match a.device {
        // burn-flex's elementwise kernels do not reach the memory bus: measure a host copy instead.
        DeviceArg::Cpu => host_copy_bandwidth(),
        _ => copy_bandwidth(&dev)?,
    };
    eprintln!(
        "built in {build_s:.1} s; copy bandwidth {:.0} GB/s",
        bandwidth / 1e9
    );
    let bits = a.precision.bits();
    let mut rng = SplitMix64::new(1);
    let mut prompts = |n: usize| -> Vec<Input> {
        (0..n)
            .map(|_| {
                Input::ids(
                    (0..a.prompt)
                        .map(|_| rng.below(config.vocab_size) as u32)
                        .collect(),
                )
            })
            .collect()
    };
    let mut ours = Vec::new();
    for &b in &a.batch {
        let inputs = prompts(b);
        // A whole generation, as the reference's warm-up: a first run can start slow on either side (on the H200
        // transformers' first 128-token generate after a 4-token one took 7.7 s, the next ones 2.4-2.5 s).
        eprintln!("batch {b}: warm-up");
        time_batch(&model, &inputs, a.new, &sampling)?;
        let mut runs = Vec::new();
        for r in 0..a.reps.max(1) {
            let timing = time_batch(&model, &inputs, a.new, &sampling)?;
            eprintln!(
                "batch {b}, run {r}: prefill {:.3} s, generate {:.2} s",
                timing.prefill_s, timing.generate_s
            );
            runs.push(timing);
        }
        let prefill = median(runs.iter().map(|r| r.prefill_s).collect());
        let generate = median(runs.iter().map(|r| r.generate_s).collect());
        let issue = median(runs.iter().map(|r| r.issue_s).collect());
        let wait = median(runs.iter().map(|r| r.wait_s).collect());
        let steps = match runs.iter().all(|r| r.replayed) {
            true => "replayed",
            false => "launched",
        };
        ours.push((b, prefill, generate, (issue, wait), steps));
    }
    let varied = match a.varied {
        true => Some(varied_table(&a, &model, &mut prompts)?),
        false => None,
    };
    let dir = std::env::temp_dir().join(format!("avb-bench-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| AvbError::io(&dir, e))?;
    let theirs = reference(&a, &body, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let theirs = theirs?;
    let capacity = (a.prompt + a.new).div_ceil(64) * 64;
    let mut table = String::from(
        "| batch | prefill s | generate s | tokens/s | explanations/s | decode tokens/s | of bandwidth ceiling | steps | issue ms/step | wait ms/step | transformers tokens/s | ratio |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (b, prefill, generate, (issue, wait), steps) in &ours {
        let tps = (*b * a.new) as f64 / generate;
        let decode_tps = (*b * (a.new - 1)) as f64 / (generate - prefill).max(1e-9);
        let step_bytes = weight_bytes(&config, bits) + kv_bytes(&config, *b, capacity);
        let ceiling = bandwidth / step_bytes * *b as f64;
        let reference_tps = theirs.as_ref().and_then(|r| {
            r["results"]
                .as_array()?
                .iter()
                .find(|x| x["batch"].as_u64() == Some(*b as u64))?["tokens_per_s"]
                .as_f64()
        });
        let (rt, ratio) = match reference_tps {
            Some(t) => (format!("{t:.1}"), format!("{:.2}x", tps / t)),
            None => ("-".into(), "-".into()),
        };
        table.push_str(&format!(
            "| {b} | {prefill:.3} | {generate:.2} | {tps:.1} | {:.3} | {decode_tps:.1} | {:.1}% | {steps} | {:.2} | {:.2} | {rt} | {ratio} |\n",
            *b as f64 / generate,
            100.0 * decode_tps / ceiling,
            1e3 * issue,
            1e3 * wait,
        ));
    }
    let params = config_params(&config);
    let reference_line = match &theirs {
        Some(r) => format!(
            "Reference: transformers {} + torch {} on {} ({}, sdpa, `generate` {decoding}, {} threads), the same shape with random weights, in the same run.",
            r["versions"]["transformers"].as_str().unwrap_or("?"),
            r["versions"]["torch"].as_str().unwrap_or("?"),
            r["device_name"].as_str().unwrap_or("?"),
            r["dtype"].as_str().unwrap_or("?"),
            r["threads"],
        ),
        None => "No reference was run.".into(),
    };
    let doc = format!(
        "Shape `{}` ({:.2}B parameters, {} layers, d = {}), random weights at {:?} on {:?}; prompt {} random tokens, {} new tokens \
         (no stop tokens), {decoding}; medians of {} runs after a warm-up. Model built on the device in {build_s:.1} s. Copy bandwidth \
         measured in this run: {:.0} GB/s. The bandwidth ceiling of a step is that bandwidth over the bytes a step must read \
         (every weight once, {:.2} GB, plus the KV cache at its capacity of {capacity} positions); `prefill s` is the generation's own start \
         (the prompts' forward pass into the KV cache and the first token, read back); `decode tokens/s` leaves it out; `tokens/s` is batch x new tokens over the whole generation, as transformers' figure is. Each step is split into \
         host time issuing its work (`issue`: the head and argmax, or the logits' sampling on the host, then the next forward pass, recorded by the host) and \
         time blocked reading the chosen ids back (`wait`: the device finishing what was issued); a step whose issue time \
         nears the whole step is bound by the host's launches, not by the device. `steps`: `replayed` where a decoding step \
         was recorded once and replayed (CubeCL graphs: one call re-encodes the recorded dispatches), `launched` where every \
         kernel was launched through burn and CubeCL (`--no-graphs`, or a backend without them).\n\n{table}\n{reference_line}\n",
        a.shape,
        params as f64 / 1e9,
        config.num_layers,
        config.hidden_size,
        a.precision,
        a.device,
        a.prompt,
        a.new,
        a.reps.max(1),
        bandwidth / 1e9,
        weight_bytes(&config, bits) / 1e9,
    );
    let doc = match varied {
        Some(t) => format!(
            "{doc}\nThe same model explaining 4 x batch sequences whose lengths vary uniformly in {}..={} tokens (`--varied`): in \
             fixed chunks of `batch`, each chunk as slow as its longest sequence, and with finished sequences' rows \
             refilled by the next prompts, a quarter of the batch at a time (their prompts prefilled together and \
             spliced into the running KV cache); one run each after a warm-up.\n\n{t}",
            (a.new / 4).max(1),
            a.new
        ),
        None => doc,
    };
    println!("{doc}");
    if let Some(p) = &a.output {
        let text = format!(
            "# `avb bench decode`: {} on {:?}\n\nCommand: `{}`\n\n{doc}",
            a.shape,
            a.device,
            crate::commands::created_by()
        );
        avb_core::io::write_atomic(p, &[text.as_bytes()])?;
    }
    Ok(())
}

/// Parameters of the projections, embedding and head (counted once when tied; norms and biases left out).
fn config_params(c: &ModelConfig) -> u64 {
    let tables = if c.tie_embeddings { 1 } else { 2 };
    c.num_layers as u64 * c.block_projection_weights()
        + tables * (c.hidden_size * c.vocab_size) as u64
}
