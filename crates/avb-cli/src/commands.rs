//! The precompute and evaluation subcommands.

use crate::inputs::{load_activations, Activations};
use avb_core::artifact::{
    self, check_washout_for_map, file_name, file_sha256, ActivationSetMeta, Artifact, Body,
    CorpusRef, FitMetrics, LambdaSelection, MappedFeaturesMeta, NamedTensor, RidgeMapMeta, Space,
    Split, WashoutMeta, WashoutUse,
};
use avb_core::features::FeatureSource;
use avb_core::io::{write_atomic, FileSource};
use avb_core::ridge::{self, AffineMap, Form};
use avb_core::safetensors::{Dtype, Header};
use avb_core::{npy, rng, stats, washout, AvbError, Matrix, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DtypeArg {
    F32,
    F16,
}

impl DtypeArg {
    pub fn dtype(self) -> Dtype {
        match self {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Ridge,
    Procrustes,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormArg {
    Auto,
    Primal,
    Dual,
}

/// The command line, with absolute paths reduced to file names (artifacts and reports must not record machine
/// paths; relative paths are kept).
pub fn created_by() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            let p = Path::new(&a);
            if i == 0 {
                "avb".to_string()
            } else if p.is_absolute() {
                file_name(p)
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]").unwrap());
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

pub fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise}, eta {eta}]")
            .unwrap(),
    );
    pb.set_message(msg.to_string());
    pb
}

/// After writing an artifact: its metadata as JSON with `--json` (returns false), else the `wrote PATH` line
/// (returns true: the caller prints its summary).
fn announce(written: &artifact::Metadata, json: bool, path: &Path) -> bool {
    if json {
        print_json(&serde_json::to_value(written).unwrap());
    } else {
        println!("wrote {}", path.display());
    }
    !json
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap());
}

// ---------------- fit-map ----------------

#[derive(clap::Args)]
pub struct FitMapArgs {
    /// Source activations (activation set artifact, [n, d_src] .npy or single-tensor safetensors).
    #[arg(long)]
    pub source: PathBuf,
    /// Target activations, same rows in the same order.
    #[arg(long)]
    pub target: PathBuf,
    /// Output map artifact (.safetensors).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = Method::Ridge)]
    pub method: Method,
    /// Ridge penalty (default 100, the seed experiment's). Conflicts with --cv-folds.
    #[arg(long, conflicts_with = "cv_folds")]
    pub lambda: Option<f64>,
    /// Choose lambda by k-fold cross-validation on the training rows.
    #[arg(long)]
    pub cv_folds: Option<usize>,
    /// Log grid for CV as LOW:HIGH:COUNT (log-spaced, inclusive).
    #[arg(long, default_value = "1e-2:1e6:17")]
    pub lambda_grid: String,
    #[arg(long, value_enum, default_value_t = FormArg::Auto)]
    pub form: FormArg,
    /// Fit without an intercept (the default fits one, like sklearn's Ridge).
    #[arg(long)]
    pub no_intercept: bool,
    /// Fraction of rows held out for the fit metrics.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    /// Seed of the held-out split (and CV folds).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Source model/layer for plain matrices (artifacts carry their own).
    #[arg(long)]
    pub source_model: Option<String>,
    #[arg(long)]
    pub source_layer: Option<u32>,
    #[arg(long)]
    pub target_model: Option<String>,
    #[arg(long)]
    pub target_layer: Option<u32>,
    /// Print the metadata as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

impl FitMapArgs {
    /// A ridge fit with lambda by 5-fold CV, an intercept, 20% held out (seed 0), f32 output, sites from the
    /// activation artifacts: what `avb demo` and `avb experiment` start from.
    pub fn cv_ridge(source: PathBuf, target: PathBuf, output: PathBuf) -> FitMapArgs {
        FitMapArgs {
            source,
            target,
            output,
            method: Method::Ridge,
            lambda: None,
            cv_folds: Some(5),
            lambda_grid: "1e-1:1e7:17".into(),
            form: FormArg::Auto,
            no_intercept: false,
            holdout: 0.2,
            seed: 0,
            dtype: DtypeArg::F32,
            source_model: None,
            source_layer: None,
            target_model: None,
            target_layer: None,
            json: false,
        }
    }
}

pub fn parse_grid(s: &str) -> Result<Vec<f64>> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || {
        AvbError::Invalid(format!("--lambda-grid `{s}` must be LOW:HIGH:COUNT with 0 < LOW <= HIGH and COUNT >= 1, e.g. 1e-2:1e6:17"))
    };
    let [lo, hi, count] = parts.as_slice() else {
        return Err(bad());
    };
    let (lo, hi, count): (f64, f64, usize) = (
        lo.parse().map_err(|_| bad())?,
        hi.parse().map_err(|_| bad())?,
        count.parse().map_err(|_| bad())?,
    );
    if !(lo > 0.0 && hi >= lo && count >= 1 && hi.is_finite()) {
        return Err(bad());
    }
    if count == 1 {
        return Ok(vec![lo]);
    }
    let (a, b) = (lo.log10(), hi.log10());
    Ok((0..count)
        .map(|i| 10f64.powf(a + (b - a) * i as f64 / (count - 1) as f64))
        .collect())
}

fn check_rows_match(src: &Activations, tgt: &Activations) -> Result<()> {
    if src.matrix.rows != tgt.matrix.rows {
        return Err(AvbError::dimension(
            "fit-map",
            format!(
                "source has {} rows but target has {}",
                src.matrix.rows, tgt.matrix.rows
            ),
            "capture both models on the same corpus rows",
        ));
    }
    if let Some(i) = (0..src.row_ids.len()).find(|i| src.row_ids[*i] != tgt.row_ids[*i]) {
        return Err(AvbError::dimension(
            "fit-map",
            format!(
                "row {i} is `{}` in the source but `{}` in the target",
                src.row_ids[i], tgt.row_ids[i]
            ),
            "capture both models on the same corpus in the same order",
        ));
    }
    Ok(())
}

pub fn fit_map(a: FitMapArgs) -> Result<()> {
    if !(0.0..1.0).contains(&a.holdout) {
        return Err(AvbError::Invalid(format!(
            "--holdout must be in [0, 1), got {}",
            a.holdout
        )));
    }
    let src = load_activations(&a.source, a.source_model.as_deref(), a.source_layer)?;
    let tgt = load_activations(&a.target, a.target_model.as_deref(), a.target_layer)?;
    check_rows_match(&src, &tgt)?;
    let n = src.matrix.rows;
    let (train_perm, hold) = rng::split(n, a.holdout, a.seed);
    if train_perm.len() < 2 {
        return Err(AvbError::Empty {
            what: "fit-map".into(),
            detail: format!(
                "{} training rows after holding out {}",
                train_perm.len(),
                hold.len()
            ),
            fix: "use more rows or a smaller --holdout".into(),
        });
    }
    let mut train = train_perm.clone();
    train.sort_unstable();
    let (xt, yt) = (
        src.matrix.select_rows(&train),
        tgt.matrix.select_rows(&train),
    );
    let form = match a.form {
        FormArg::Auto => Form::Auto,
        FormArg::Primal => Form::Primal,
        FormArg::Dual => Form::Dual,
    };
    let fit_intercept = !a.no_intercept;

    let mut selection = None;
    let lambda = match (a.method, a.cv_folds) {
        (Method::Procrustes, _) => None,
        (Method::Ridge, None) => Some(a.lambda.unwrap_or(100.0)),
        (Method::Ridge, Some(k)) => {
            let grid = parse_grid(&a.lambda_grid)?;
            let mut fold_of = vec![0usize; n];
            for (i, row) in train_perm.iter().enumerate() {
                fold_of[*row] = i % k;
            }
            let folds: Vec<usize> = train.iter().map(|r| fold_of[*r]).collect();
            let pb = bar(k as u64, "cross-validating lambda (folds)");
            let scores = ridge::cross_validate(
                &xt,
                &yt,
                &folds,
                k,
                &grid,
                form,
                fit_intercept,
                &mut |_| pb.inc(1),
            )?;
            pb.finish_and_clear();
            let best = (0..grid.len())
                .filter(|i| scores[*i].is_finite())
                .max_by(|i, j| scores[*i].total_cmp(&scores[*j]))
                .ok_or_else(|| {
                    AvbError::Invalid("cross-validation produced no finite score".into())
                })?;
            if best == 0 || best == grid.len() - 1 {
                eprintln!(
                    "warning: cross-validation chose lambda = {:.1e}, at the edge of --lambda-grid; the best value may lie outside it. Widen the grid.",
                    grid[best]
                );
            }
            selection = Some(LambdaSelection {
                mode: "cv".into(),
                folds: Some(k),
                grid,
                cv_r2: scores.clone(),
            });
            Some(selection.as_ref().unwrap().grid[best])
        }
    };
    let pb = spinner(&format!(
        "fitting {} map on {} rows ({} -> {})",
        if lambda.is_some() {
            "ridge"
        } else {
            "procrustes"
        },
        train.len(),
        xt.cols,
        yt.cols
    ));
    let (map, solver) = match lambda {
        Some(l) => {
            let fit = ridge::fit_ridge(&xt, &yt, l, form, fit_intercept)?;
            let solve = match fit.f32_solve {
                Some(e) => format!("f32 solve, est. prediction error {e:.1e}"),
                None => "f64 solve".to_string(),
            };
            (fit.map, format!("{} ({solve})", fit.form.name()))
        }
        None => (
            ridge::fit_procrustes(&xt, &yt, fit_intercept)?,
            "svd".to_string(),
        ),
    };
    pb.finish_and_clear();
    if selection.is_none() {
        if let Some(l) = lambda {
            selection = Some(LambdaSelection {
                mode: "given".into(),
                folds: None,
                grid: vec![l],
                cv_r2: vec![],
            });
        }
    }
    let ymean = ridge::target_mean(&yt);
    let train_metrics = ridge::fit_metrics(&map.apply(&xt, true)?, &yt, &ymean);
    let (heldout, hold_cos) = if hold.is_empty() {
        (None, vec![])
    } else {
        let (xh, yh) = (src.matrix.select_rows(&hold), tgt.matrix.select_rows(&hold));
        let pred = map.apply(&xh, true)?;
        (
            Some(ridge::fit_metrics(&pred, &yh, &ymean)),
            ridge::row_cosines(&pred, &yh),
        )
    };
    let mut inputs = BTreeMap::new();
    inputs.insert("source".to_string(), src.input.clone());
    inputs.insert("target".to_string(), tgt.input.clone());
    let meta = RidgeMapMeta {
        source: src.space.clone(),
        target: tgt.space.clone(),
        method: if lambda.is_some() {
            "ridge"
        } else {
            "procrustes"
        }
        .into(),
        solver,
        lambda,
        lambda_selection: selection,
        fit_intercept,
        split: Split {
            algorithm: "splitmix64-fisher-yates-v1".into(),
            seed: a.seed,
            holdout_fraction: a.holdout,
            n_train: train.len(),
            n_holdout: hold.len(),
            holdout_row_ids: hold.iter().map(|i| src.row_ids[*i].clone()).collect(),
        },
        inputs,
        heldout,
        train: train_metrics,
    };
    let hold_cos_f32: Vec<f32> = hold_cos.iter().map(|c| *c as f32).collect();
    let mut tensors = vec![
        NamedTensor {
            name: "weight",
            shape: vec![map.d_src(), map.d_tgt()],
            values: &map.weight.data,
        },
        NamedTensor {
            name: "bias",
            shape: vec![map.d_tgt()],
            values: &map.bias,
        },
    ];
    if !hold_cos_f32.is_empty() {
        tensors.push(NamedTensor {
            name: "holdout_row_cosine",
            shape: vec![hold_cos_f32.len()],
            values: &hold_cos_f32,
        });
    }
    let written = artifact::write(
        &a.output,
        Body::RidgeMap(meta.clone()),
        &created_by(),
        a.dtype.dtype(),
        &tensors,
    )?;
    if announce(&written, a.json, &a.output) {
        print_map_summary(&meta);
    }
    Ok(())
}

fn fmt_metrics(m: &FitMetrics) -> String {
    format!(
        "n={} mean cos {:.4} (centred {:.4}, constant-mean baseline {:.4}), R2 {:.4} (per-dim mean {:.4}), cos quantiles 5/50/95% {:.3}/{:.3}/{:.3}",
        m.n, m.mean_cosine, m.mean_centered_cosine, m.mean_baseline_cosine, m.r2_variance_weighted, m.r2_uniform, m.cosine_quantiles[1], m.cosine_quantiles[3], m.cosine_quantiles[5]
    )
}

fn print_map_summary(m: &RidgeMapMeta) {
    println!(
        "  map      {} -> {}",
        Space::to_string(&m.source),
        Space::to_string(&m.target)
    );
    let lam = m.lambda.map_or("-".to_string(), |l| format!("{l:.4e}"));
    println!(
        "  method   {} ({}), lambda {lam}, intercept {}",
        m.method, m.solver, m.fit_intercept
    );
    if let Some(sel) = &m.lambda_selection {
        if sel.mode == "cv" {
            let pairs: Vec<String> = sel
                .grid
                .iter()
                .zip(&sel.cv_r2)
                .map(|(l, s)| format!("{l:.0e}:{s:.4}"))
                .collect();
            println!("  cv R2    {}", pairs.join(" "));
        }
    }
    println!(
        "  split    seed {}, {} train / {} held out",
        m.split.seed, m.split.n_train, m.split.n_holdout
    );
    println!("  train    {}", fmt_metrics(&m.train));
    if let Some(h) = &m.heldout {
        println!("  held-out {}", fmt_metrics(h));
    }
}

// ---------------- washout ----------------

#[derive(clap::Args)]
pub struct WashoutArgs {
    /// Target-model activations (the post uses last-token activations of ~100 multilingual sentences).
    #[arg(long)]
    pub activations: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub site: crate::inputs::SiteFlags,
    #[arg(long)]
    pub json: bool,
}

pub fn washout(a: WashoutArgs) -> Result<()> {
    let act = load_activations(&a.activations, a.site.model.as_deref(), a.site.layer)?;
    let (b, norm) = washout::washout_vector(
        &act.matrix,
        &format!("activations {}", a.activations.display()),
    )?;
    let meta = WashoutMeta {
        space: act.space.clone(),
        pooling: act.pooling.clone(),
        n_rows: act.matrix.rows,
        input: act.input.clone(),
        norm,
    };
    let written = artifact::write(
        &a.output,
        Body::Washout(meta),
        &created_by(),
        Dtype::F32,
        &[NamedTensor {
            name: "washout",
            shape: vec![b.len()],
            values: &b,
        }],
    )?;
    if announce(&written, a.json, &a.output) {
        println!(
            "  washout  {}, {} rows ({} pooling), ||b|| = {norm:.4}",
            Space::to_string(&act.space),
            act.matrix.rows,
            act.pooling
        );
    }
    Ok(())
}

// ---------------- map ----------------

#[derive(clap::Args)]
pub struct MapArgs {
    /// Ridge map artifact from `avb fit-map`.
    #[arg(long)]
    pub map: PathBuf,
    /// Features: SAELens dir, GemmaScope params.safetensors, [n, d] .safetensors/.npy directions.
    #[arg(long)]
    pub features: PathBuf,
    /// Labels JSON for direction files (default: <stem>.labels.json beside them).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Feature ids to map, e.g. 3,17,2048 (default: all).
    #[arg(long, value_delimiter = ',', conflicts_with = "range")]
    pub ids: Option<Vec<u64>>,
    /// Feature id range START:END (end exclusive).
    #[arg(long)]
    pub range: Option<String>,
    /// Washout artifact (target space) to blend in: normalize(normalize(Wd) + w b).
    #[arg(long)]
    pub washout: Option<PathBuf>,
    /// Washout weight w.
    #[arg(long, default_value_t = 1.0, requires = "washout")]
    pub weight: f64,
    /// Add the map's intercept (by default directions are mapped by the linear part only).
    #[arg(long)]
    pub affine: bool,
    /// Map even when the features' recorded model/layer differs from the map's source.
    #[arg(long)]
    pub allow_site_mismatch: bool,
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(long)]
    pub json: bool,
}

/// Open an artifact and require its kind.
pub fn open_kind(path: &Path, kind: &str) -> Result<Artifact> {
    let art = Artifact::open(path)?;
    if art.meta.body.kind() != kind {
        return Err(AvbError::unsupported(
            path,
            format!(
                "expected a `{kind}` artifact, got `{}`",
                art.meta.body.kind()
            ),
        ));
    }
    Ok(art)
}

fn parse_range(s: &str, n: usize) -> Result<Vec<u64>> {
    let bad = || {
        AvbError::Invalid(format!(
            "--range `{s}` must be START:END with START < END <= {n}"
        ))
    };
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a >= b || b > n as u64 {
        return Err(bad());
    }
    Ok((a..b).collect())
}

pub fn map(a: MapArgs) -> Result<()> {
    let map_art = open_kind(&a.map, "ridge_map")?;
    let Body::RidgeMap(mm) = map_art.meta.body.clone() else {
        unreachable!()
    };
    let weight = map_art.read_matrix("weight")?;
    let (_, bias) = map_art.read_tensor("bias")?;
    let affine_map = AffineMap { weight, bias };
    let feats = FeatureSource::open(&a.features, a.labels.as_deref())?;
    if feats.d() != mm.source.d {
        return Err(AvbError::dimension(
            format!("features {}", a.features.display()),
            format!(
                "directions have d = {} but the map's source space has d = {}",
                feats.d(),
                mm.source.d
            ),
            format!(
                "use a map fitted from {} or features from that space",
                Space::to_string(&mm.source)
            ),
        ));
    }
    if let Some(space) = &feats.space {
        if !a.allow_site_mismatch && !Space::same_site(space, &mm.source) {
            return Err(AvbError::Invalid(format!(
                "features live at {} but the map starts from {}. Fix: use a map fitted from the features' model and layer, or pass --allow-site-mismatch.",
                Space::to_string(space),
                Space::to_string(&mm.source)
            )));
        }
    }
    let wash = match &a.washout {
        Some(p) => {
            let art = open_kind(p, "washout")?;
            let Body::Washout(wm) = art.meta.body.clone() else {
                unreachable!()
            };
            check_washout_for_map(&wm.space, &mm.target)?;
            let (_, b) = art.read_tensor("washout")?;
            Some((b, art.input_ref()))
        }
        None => None,
    };
    let ids = match (&a.ids, &a.range) {
        (Some(ids), _) => ids.clone(),
        (None, Some(r)) => parse_range(r, feats.len())?,
        (None, None) => (0..feats.len()).map(|i| feats.id(i)).collect(),
    };
    if ids.is_empty() {
        return Err(AvbError::Empty {
            what: "map".into(),
            detail: "no features selected".into(),
            fix: "pass --ids or --range, or a non-empty feature file".into(),
        });
    }
    let rows: Vec<usize> = ids
        .iter()
        .map(|id| feats.index_of(*id))
        .collect::<Result<_>>()?;
    let pb = bar(rows.len() as u64, "mapping features");
    let mut out = Vec::with_capacity(rows.len() * mm.target.d);
    const BATCH: usize = 2048;
    for chunk in rows.chunks(BATCH) {
        let mut data = Vec::with_capacity(chunk.len() * feats.d());
        for r in chunk {
            data.extend(feats.row(*r)?);
        }
        let mapped = affine_map.apply(&Matrix::new(chunk.len(), feats.d(), data), a.affine)?;
        for i in 0..mapped.rows {
            match &wash {
                Some((b, _)) => out.extend(washout::mix(mapped.row(i), b, a.weight)?),
                None => out.extend_from_slice(mapped.row(i)),
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let labels = feats.labels.as_ref().map(|_| {
        rows.iter()
            .map(|r| feats.label(*r).map(str::to_string))
            .collect()
    });
    let meta = MappedFeaturesMeta {
        source: feats.space.clone().unwrap_or_else(|| mm.source.clone()),
        target: mm.target.clone(),
        features_kind: feats.kind.clone(),
        features: feats.input_ref()?,
        feature_ids: ids.clone(),
        labels,
        map: Some(map_art.input_ref()),
        affine: a.affine,
        washout: wash.as_ref().map(|(_, r)| WashoutUse {
            input: r.clone(),
            weight: a.weight,
        }),
        normalized: wash.is_some(),
    };
    let written = artifact::write(
        &a.output,
        Body::MappedFeatures(meta),
        &created_by(),
        a.dtype.dtype(),
        &[NamedTensor {
            name: "features",
            shape: vec![ids.len(), mm.target.d],
            values: &out,
        }],
    )?;
    if announce(&written, a.json, &a.output) {
        println!(
            "  {} features ({}) {} -> {}, washout {}",
            ids.len(),
            feats.kind,
            Space::to_string(&mm.source),
            Space::to_string(&mm.target),
            wash.as_ref()
                .map_or("none".to_string(), |_| format!("w = {}", a.weight))
        );
    }
    Ok(())
}

// ---------------- inspect ----------------

#[derive(clap::Args)]
pub struct InspectArgs {
    /// An avbridge artifact, SAELens directory, safetensors file or .npy file.
    pub path: PathBuf,
    /// Skip the payload hash check.
    #[arg(long)]
    pub no_verify: bool,
    #[arg(long)]
    pub json: bool,
}

fn tensor_table(h: &Header) -> serde_json::Value {
    h.tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                json!({"dtype": t.dtype.name(), "shape": t.shape}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// GGUF summary: architecture, tensor types and parameter count, and the metadata (long arrays by length).
fn inspect_gguf(p: &Path) -> Result<serde_json::Value> {
    use avb_model::gguf::{Gguf, MetaValue};
    let src = FileSource::open(p)?;
    let g = Gguf::read(&src)?;
    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &g.tensors {
        *types.entry(t.ty.name()).or_default() += 1;
    }
    fn show(v: &MetaValue) -> serde_json::Value {
        match v {
            MetaValue::String(s) if s.len() > 200 => json!(format!("<{} characters>", s.len())),
            MetaValue::String(s) => json!(s),
            MetaValue::Bool(b) => json!(b),
            MetaValue::Array(a) if a.len() > 16 => json!(format!("<array of {}>", a.len())),
            MetaValue::Array(a) => serde_json::Value::Array(a.iter().map(show).collect()),
            other => other.as_f64().map_or(serde_json::Value::Null, |f| {
                if other.as_i64().is_some() {
                    json!(other.as_i64())
                } else {
                    json!(f)
                }
            }),
        }
    }
    let metadata: serde_json::Map<String, serde_json::Value> = g
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), show(v)))
        .collect();
    Ok(
        json!({"path": p.display().to_string(), "kind": "gguf", "version": g.version,
              "architecture": g.meta("general.architecture").and_then(|v| v.as_str()),
              "tensors": g.tensors.len(), "tensor_types": types,
              "parameters": g.tensors.iter().map(|t| t.numel()).sum::<u64>(),
              "metadata": metadata, "integrity": "structure ok (GGUF records no hash)"}),
    )
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let p = &a.path;
    let report = if p.is_dir() || p.file_name().is_some_and(|n| n == "cfg.json") {
        let f = FeatureSource::open(p, None)?;
        json!({"path": p.display().to_string(), "kind": f.kind, "features": f.len(), "d": f.d(), "space": f.space, "labels": f.labels.is_some(),
               "integrity": "structure ok (no recorded hash)"})
    } else if p.extension().is_some_and(|e| e == "gguf") {
        inspect_gguf(p)?
    } else if p.extension().is_some_and(|e| e == "npy") {
        let info = npy::read_header(&FileSource::open(p)?)?;
        json!({"path": p.display().to_string(), "kind": "npy", "dtype": info.dtype.name(), "shape": info.shape, "sha256": file_sha256(p)?,
               "integrity": "structure ok (no recorded hash)"})
    } else {
        let src = FileSource::open(p)?;
        let header = Header::read(&src)?;
        if header.metadata.contains_key(artifact::METADATA_KEY) {
            let art = Artifact::open(p)?;
            let integrity = if a.no_verify {
                "not checked (--no-verify)".to_string()
            } else {
                art.verify()?;
                format!(
                    "ok: payload sha256 {} ({} chunks verified)",
                    art.meta.payload.sha256,
                    art.meta.payload.chunk_sha256.len()
                )
            };
            let mut meta = serde_json::to_value(&art.meta).unwrap();
            if let Some(m) = meta.as_object_mut() {
                m.remove("payload");
            }
            json!({"path": p.display().to_string(), "kind": art.meta.body.kind(), "metadata": meta, "tensors": tensor_table(&art.header), "integrity": integrity})
        } else {
            json!({"path": p.display().to_string(), "kind": "safetensors", "metadata": header.metadata, "tensors": tensor_table(&header),
                   "integrity": "structure ok (no recorded hash)"})
        }
    };
    if a.json {
        print_json(&report);
    } else {
        println!(
            "{}  [{}]",
            p.display(),
            report["kind"].as_str().unwrap_or("")
        );
        for (k, v) in report.as_object().unwrap() {
            if k != "path" && k != "kind" {
                println!(
                    "  {k}: {}",
                    serde_json::to_string_pretty(v)
                        .unwrap()
                        .replace('\n', "\n  ")
                );
            }
        }
    }
    Ok(())
}

// ---------------- eval-embeddings ----------------

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Embeddings of the native explanations B, one row per feature (.npy or safetensors).
    #[arg(long)]
    pub native: PathBuf,
    /// Embeddings of the cross-condition explanations C, same feature order.
    #[arg(long)]
    pub cross: PathBuf,
    /// Embeddings of random-direction control explanations (enables the control-lift variant).
    #[arg(long)]
    pub control: Option<PathBuf>,
    #[arg(long, default_value_t = 0.95)]
    pub level: f64,
    #[arg(long, default_value_t = 10_000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write per-feature lifts as JSONL here.
    #[arg(long)]
    pub per_feature: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn load_matrix(path: &Path) -> Result<Matrix> {
    Ok(load_activations(path, None, None)?.matrix)
}

pub fn eval_embeddings(a: EvalArgs) -> Result<()> {
    if !(a.level > 0.0 && a.level < 1.0) {
        return Err(AvbError::Invalid(format!(
            "--level must be in (0, 1), got {}",
            a.level
        )));
    }
    if a.bootstrap < 100 {
        return Err(AvbError::Invalid(
            "--bootstrap needs at least 100 resamples".into(),
        ));
    }
    let (native, cross) = (load_matrix(&a.native)?, load_matrix(&a.cross)?);
    let lift = stats::lift(&cross, &native)?;
    let lift_summary = stats::summarize(&lift, a.level, a.bootstrap, a.seed)?;
    let mut report = json!({"n_features": native.rows, "lift": lift_summary});
    let mut summaries = vec![("vs other features", lift_summary)];
    let control = match &a.control {
        Some(p) => {
            let c = stats::control_lift(&cross, &native, &load_matrix(p)?)?;
            let cs = stats::summarize(&c, a.level, a.bootstrap, a.seed)?;
            report["control_lift"] = serde_json::to_value(&cs).unwrap();
            summaries.push(("vs random controls", cs));
            Some(c)
        }
        None => None,
    };
    if let Some(path) = &a.per_feature {
        let mut text = String::new();
        for (i, l) in lift.iter().enumerate() {
            let mut row = json!({"feature": i, "lift": l});
            if let Some(c) = &control {
                row["control_lift"] = json!(c[i]);
            }
            text.push_str(&row.to_string());
            text.push('\n');
        }
        write_atomic(path, &[text.as_bytes()])?;
    }
    if a.json {
        print_json(&report);
        return Ok(());
    }
    println!("| variant | n | mean lift | {0:.0}% CI (t) | {0:.0}% CI (BCa bootstrap) | t-test p | Wilcoxon p |", a.level * 100.0);
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (variant, s) in &summaries {
        {
            println!(
                "| {variant} | {} | {:+.4} | [{:+.4}, {:+.4}] | [{:+.4}, {:+.4}] | {:.3e} | {:.3e} ({}) |",
                s.n,
                s.mean,
                s.t_ci.0,
                s.t_ci.1,
                s.bootstrap.bca.0,
                s.bootstrap.bca.1,
                s.ttest.pvalue,
                s.wilcoxon.pvalue,
                s.wilcoxon.method
            );
        }
    }
    Ok(())
}

// ---------------- import-activations ----------------

#[derive(clap::Args)]
pub struct ImportArgs {
    /// [n, d] activation matrix (.npy).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub model: String,
    /// Layer K: output of decoder block K.
    #[arg(long)]
    pub layer: u32,
    /// How token positions were pooled.
    #[arg(long, value_parser = ["mean", "last"])]
    pub pooling: String,
    /// The corpus JSONL the rows come from (one `{"id": ...}` line per row, in order).
    #[arg(long)]
    pub corpus: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

/// One string field of every line of a corpus JSONL file (`id`, `text`, ...), in order.
pub fn corpus_field(path: &Path, field: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| AvbError::io(path, e))?;
    jsonl_field(&text, path, field)
}

/// One JSON object per non-empty line of `text` (`source` names it in errors).
pub fn jsonl_values(text: &str, source: &Path) -> Result<Vec<serde_json::Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| AvbError::corrupt(source, format!("line {}: not JSON ({e})", i + 1)))
        })
        .collect()
}

/// The string `field` of every line of a JSONL text.
pub fn jsonl_field(text: &str, source: &Path, field: &str) -> Result<Vec<String>> {
    jsonl_values(text, source)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.get(field)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    AvbError::corrupt(source, format!("line {}: no string `{field}`", i + 1))
                })
        })
        .collect()
}

/// The provenance record of a corpus file: its stem and sha256.
pub fn corpus_ref(path: &Path) -> Result<CorpusRef> {
    Ok(CorpusRef {
        id: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: file_sha256(path)?,
    })
}

/// Row ids from a corpus JSONL file.
pub fn corpus_ids(path: &Path) -> Result<Vec<String>> {
    corpus_field(path, "id")
}

pub fn import_activations(a: ImportArgs) -> Result<()> {
    let act = load_activations(&a.input, Some(&a.model), Some(a.layer))?;
    let ids = corpus_ids(&a.corpus)?;
    if ids.len() != act.matrix.rows {
        return Err(AvbError::dimension(
            format!("import {}", a.input.display()),
            format!(
                "{} rows but the corpus has {} lines",
                act.matrix.rows,
                ids.len()
            ),
            "pass the corpus file the activations were captured from",
        ));
    }
    let meta = ActivationSetMeta {
        space: act.space.clone(),
        pooling: a.pooling.clone(),
        corpus: corpus_ref(&a.corpus)?,
        row_ids: ids,
    };
    artifact::write(
        &a.output,
        Body::ActivationSet(meta),
        &created_by(),
        a.dtype.dtype(),
        &[NamedTensor {
            name: "activations",
            shape: vec![act.matrix.rows, act.matrix.cols],
            values: &act.matrix.data,
        }],
    )?;
    println!(
        "wrote {} ({} rows x {}, {} L{} {} pooling)",
        a.output.display(),
        act.matrix.rows,
        act.matrix.cols,
        a.model,
        a.layer,
        a.pooling
    );
    Ok(())
}
