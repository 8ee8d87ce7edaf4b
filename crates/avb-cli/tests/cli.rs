//! End-to-end runs of the `avb` binary on the golden fixtures: import -> fit-map -> washout -> map -> inspect
//! -> eval-embeddings, and the CLI's bad-input behaviour (message, exit code, no output left behind).

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(name)
}

fn golden_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("golden.json")).unwrap()).unwrap()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn avb(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_avb"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> String {
    let r = avb(args);
    assert_eq!(r.code, 0, "avb {args:?} failed: {}", r.stderr);
    r.stdout
}

fn fails(args: &[&str], needle: &str) {
    let r = avb(args);
    assert_eq!(r.code, 1, "avb {args:?} should fail; stdout {}", r.stdout);
    assert!(
        r.stderr.contains(needle),
        "avb {args:?}: expected `{needle}` in: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `avb import-activations` arguments for a mean-pooled capture.
fn import_args<'a>(
    input: &'a str,
    model: &'a str,
    layer: &'a str,
    corpus: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    vec![
        "import-activations",
        "--input",
        input,
        "--model",
        model,
        "--layer",
        layer,
        "--pooling",
        "mean",
        "--corpus",
        corpus,
        "-o",
        out,
    ]
}

fn corpus(dir: &Path, n: usize, prefix: &str) -> PathBuf {
    let p = dir.join(format!("{prefix}.jsonl"));
    let text: String = (0..n)
        .map(|i| format!("{{\"id\": \"{prefix}-{i}\", \"text\": \"sentence {i}\"}}\n"))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn pipeline_on_golden_activations() {
    let g = golden_json();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = corpus(d, 300, "wiki");
    let (src, tgt) = (d.join("src.safetensors"), d.join("tgt.safetensors"));
    ok(&import_args(
        s(&golden("primal_x.npy")),
        "org/source-model",
        "5",
        s(&c),
        s(&src),
    ));
    ok(&import_args(
        s(&golden("primal_y.npy")),
        "org/target-model",
        "9",
        s(&c),
        s(&tgt),
    ));

    // Fixed lambda: held-out metrics equal numpy's on the documented split (seed 7).
    let map = d.join("map.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&ok(&[
        "fit-map",
        "--source",
        s(&src),
        "--target",
        s(&tgt),
        "--lambda",
        "100",
        "--seed",
        "7",
        "-o",
        s(&map),
        "--json",
    ]))
    .unwrap();
    let want = &g["ridge_primal"]["heldout"];
    for key in [
        "mean_cosine",
        "r2_variance_weighted",
        "r2_uniform",
        "mean_centered_cosine",
    ] {
        let (got, exp) = (
            meta["heldout"][key].as_f64().unwrap(),
            want[key].as_f64().unwrap(),
        );
        assert!((got - exp).abs() < 1e-5, "{key}: {got} vs {exp}");
    }
    assert_eq!(meta["split"]["n_holdout"], 60);
    assert_eq!(meta["source"]["layer"], 5);
    assert_eq!(meta["target"]["model"], "org/target-model");
    assert_eq!(
        meta["created_by"]
            .as_str()
            .unwrap()
            .split(' ')
            .nth(3)
            .unwrap(),
        "src.safetensors",
        "machine paths must not be recorded"
    );

    // CV picks the grid point with the best mean fold R^2 (same grid as the golden file).
    let cvmap = d.join("cv.safetensors");
    let cv: serde_json::Value = serde_json::from_str(&ok(&[
        "fit-map",
        "--source",
        s(&src),
        "--target",
        s(&tgt),
        "--cv-folds",
        "5",
        "--lambda-grid",
        "1e-2:1e6:5",
        "--seed",
        "7",
        "-o",
        s(&cvmap),
        "--json",
    ]))
    .unwrap();
    let scores: Vec<f64> = g["ridge_primal"]["cv_r2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let best = (0..scores.len())
        .max_by(|a, b| scores[*a].total_cmp(&scores[*b]))
        .unwrap();
    let grid = [0.01, 1.0, 100.0, 1e4, 1e6];
    assert!((cv["lambda"].as_f64().unwrap() - grid[best]).abs() < 1e-9 * grid[best]);
    assert_eq!(cv["lambda_selection"]["mode"], "cv");

    let pro = d.join("procrustes.safetensors");
    let p: serde_json::Value = serde_json::from_str(&ok(&[
        "fit-map",
        "--source",
        s(&src),
        "--target",
        s(&tgt),
        "--method",
        "procrustes",
        "--seed",
        "7",
        "-o",
        s(&pro),
        "--json",
    ]))
    .unwrap();
    assert_eq!(p["solver"], "svd");

    let wash = d.join("washout.safetensors");
    ok(&["washout", "--activations", s(&tgt), "-o", s(&wash)]);

    // Map 5 source rows used as directions, with washout w = 0.5.
    let feats = d.join("feats.npy");
    std::fs::copy(golden("primal_x.npy"), &feats).unwrap();
    let table = d.join("mapped.safetensors");
    let t: serde_json::Value = serde_json::from_str(&ok(&[
        "map",
        "--map",
        s(&map),
        "--features",
        s(&feats),
        "--ids",
        "0,4,299",
        "--washout",
        s(&wash),
        "--weight",
        "0.5",
        "-o",
        s(&table),
        "--json",
    ]))
    .unwrap();
    assert_eq!(t["feature_ids"], serde_json::json!([0, 4, 299]));
    assert_eq!(t["washout"]["weight"], 0.5);
    assert_eq!(t["normalized"], true);
    let insp: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&map), "--json"])).unwrap();
    assert_eq!(
        t["map"]["sha256"].as_str().unwrap(),
        insp["integrity"]
            .as_str()
            .unwrap()
            .split(' ')
            .nth(3)
            .unwrap()
    );
    for f in [&src, &tgt, &map, &cvmap, &pro, &wash, &table] {
        let r: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(f), "--json"])).unwrap();
        assert!(
            r["integrity"]
                .as_str()
                .unwrap()
                .starts_with("ok: payload sha256"),
            "{f:?}: {r}"
        );
    }
    // The mapped table is itself a feature source (re-mapping it is refused by dimension).
    fails(
        &[
            "map",
            "--map",
            s(&map),
            "--features",
            s(&table),
            "-o",
            s(&d.join("x.safetensors")),
        ],
        "directions have d = 24 but the map's source space has d = 40",
    );
    assert!(!d.join("x.safetensors").exists());
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c300 = corpus(d, 300, "wiki");
    let other = corpus(d, 300, "other");
    let (src, tgt) = (d.join("src.safetensors"), d.join("tgt.safetensors"));
    ok(&import_args(
        s(&golden("primal_x.npy")),
        "a",
        "1",
        s(&c300),
        s(&src),
    ));
    ok(&import_args(
        s(&golden("primal_y.npy")),
        "b",
        "2",
        s(&other),
        s(&tgt),
    ));
    let out = d.join("out.safetensors");
    fails(
        &[
            "fit-map",
            "--source",
            s(&src),
            "--target",
            s(&tgt),
            "-o",
            s(&out),
        ],
        "row 0 is `wiki-0` in the source but `other-0` in the target",
    );
    fails(
        &import_args(s(&golden("dual_x.npy")), "a", "1", s(&c300), s(&out)),
        "30 rows but the corpus has 300 lines",
    );
    fails(
        &[
            "fit-map",
            "--source",
            s(&golden("primal_x.npy")),
            "--target",
            s(&golden("dual_y.npy")),
            "-o",
            s(&out),
        ],
        "source has 300 rows but target has 30",
    );
    fails(
        &[
            "fit-map",
            "--source",
            s(&src),
            "--target",
            s(&src),
            "--holdout",
            "1.5",
            "-o",
            s(&out),
        ],
        "--holdout must be in [0, 1)",
    );
    fails(
        &[
            "fit-map",
            "--source",
            s(&src),
            "--target",
            s(&src),
            "--cv-folds",
            "3",
            "--lambda-grid",
            "5:1:3",
            "-o",
            s(&out),
        ],
        "--lambda-grid `5:1:3`",
    );
    fails(
        &[
            "washout",
            "--activations",
            s(&d.join("nope.safetensors")),
            "-o",
            s(&out),
        ],
        "nope.safetensors: cannot read",
    );
    assert!(!out.exists());

    // NaN in an input matrix
    let nan = d.join("nan.npy");
    let mut bytes = std::fs::read(golden("dual_x.npy")).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&nan, &bytes).unwrap();
    fails(
        &["washout", "--activations", s(&nan), "-o", s(&out)],
        "non-finite value (NaN or Inf) at row 29, column 79",
    );

    // Tampered artifact: inspect names the chunk; reading it for a fit refuses too.
    let mut art = std::fs::read(&src).unwrap();
    let len = art.len();
    art[len - 3] ^= 0x55;
    let bad = d.join("bad.safetensors");
    std::fs::write(&bad, &art).unwrap();
    fails(&["inspect", s(&bad)], "sha256 mismatch in payload chunk 0");
    fails(
        &["washout", "--activations", s(&bad), "-o", s(&out)],
        "sha256 mismatch",
    );
    // Truncated artifact
    std::fs::write(&bad, &art[..len / 2]).unwrap();
    fails(&["inspect", s(&bad)], "truncated");
    // Wrong artifact kind
    fails(
        &[
            "map",
            "--map",
            s(&src),
            "--features",
            s(&golden("primal_x.npy")),
            "-o",
            s(&out),
        ],
        "expected a `ridge_map` artifact, got `activation_set`",
    );
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn eval_embeddings_matches_golden_lift() {
    let g = golden_json();
    let dir = tempfile::tempdir().unwrap();
    let per = dir.path().join("per.jsonl");
    let r: serde_json::Value = serde_json::from_str(&ok(&[
        "eval-embeddings",
        "--native",
        s(&golden("emb_native.npy")),
        "--cross",
        s(&golden("emb_cross.npy")),
        "--control",
        s(&golden("emb_control.npy")),
        "--bootstrap",
        "2000",
        "--per-feature",
        s(&per),
        "--json",
    ]))
    .unwrap();
    let lift = &g["stats"]["samples"]["lift"];
    assert!((r["lift"]["mean"].as_f64().unwrap() - lift["mean"].as_f64().unwrap()).abs() < 1e-12);
    let p = r["lift"]["ttest"]["pvalue"].as_f64().unwrap();
    let want = lift["ttest_p"].as_f64().unwrap();
    assert!((p - want).abs() <= 1e-9 * want, "{p} vs {want}");
    assert!(r["control_lift"]["mean"].as_f64().is_some());
    assert_eq!(std::fs::read_to_string(&per).unwrap().lines().count(), 45);
    let table = ok(&[
        "eval-embeddings",
        "--native",
        s(&golden("emb_native.npy")),
        "--cross",
        s(&golden("emb_cross.npy")),
    ]);
    assert!(table.contains("| vs other features | 45 |"), "{table}");
    fails(
        &[
            "eval-embeddings",
            "--native",
            s(&golden("emb_native.npy")),
            "--cross",
            s(&golden("emb_control.npy")),
        ],
        "20 cross rows but 45 native rows",
    );
}

#[test]
fn demo_runs_on_the_embedded_captures() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = (dir.path().join("demo"), dir.path().join("report.md"));
    ok(&[
        "demo",
        "--source",
        "smollm2",
        "--target",
        "qwen",
        "--out",
        s(&out),
        "--report",
        s(&report),
    ]);
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("| ridge: vs other topics | 10 |"), "{text}");
    let map: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&out.join("map.safetensors")), "--json"])).unwrap();
    let h = &map["metadata"]["heldout"];
    // On held-out sentences the map must beat predicting the training mean (the shared mean direction).
    assert!(h["mean_cosine"].as_f64().unwrap() > h["mean_baseline_cosine"].as_f64().unwrap());
    assert!(h["mean_centered_cosine"].as_f64().unwrap() > 0.5, "{h}");
    assert_eq!(
        map["metadata"]["source"]["model"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    assert_eq!(map["metadata"]["lambda_selection"]["mode"], "cv");
    fails(
        &["demo", "--source", "llama"],
        "unknown embedded model `llama`",
    );
}

#[test]
fn inspect_reads_gguf_headers() {
    let gguf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/types.gguf");
    let r: serde_json::Value = serde_json::from_str(&ok(&["inspect", s(&gguf), "--json"])).unwrap();
    assert_eq!(r["kind"], "gguf");
    assert_eq!(r["architecture"], "avbtest");
    assert_eq!(r["tensors"], 11);
    assert_eq!(r["parameters"], 11 * 3 * 512);
    assert_eq!(r["tensor_types"]["Q6_K"], 1);
    assert_eq!(
        r["metadata"]["test.strings"],
        serde_json::json!(["a", "bb", "", "ccc"])
    );
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(&gguf).unwrap()[..500]).unwrap();
    fails(&["inspect", s(&cut)], "truncated");
}

/// `avb capture` on the real SmolLM2 GGUF reproduces the transformers captures the demo embeds
/// (tests/scripts/capture_reference.py: block 20 output, mean over at most 64 tokens, BOS included).
#[test]
fn capture_matches_the_transformers_reference_captures() {
    use avb_core::artifact::Artifact;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2_L20.safetensors");
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/corpus/wiki_en_sentences.jsonl");
    let n = 40;
    let stdout = ok(&[
        "capture",
        "--model",
        "smollm2-135m-instruct",
        "--layer",
        "20",
        "--corpus",
        s(&corpus),
        "--limit",
        &n.to_string(),
        "--batch",
        "8",
        "-o",
        s(&out),
    ]);
    assert!(stdout.contains("tokens/s"), "{stdout}");
    let ours = Artifact::open(&out).unwrap();
    let reference = Artifact::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/captures/smollm2-135m-instruct_L20_wiki_mean.safetensors"),
    )
    .unwrap();
    let (shape, a) = ours.read_tensor("activations").unwrap();
    let (_, b) = reference.read_tensor("activations").unwrap();
    let d = shape[1];
    for r in 0..n {
        let (x, y) = (&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d]);
        let dot: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
        assert!(
            dot / (nx * ny) > 0.9999,
            "row {r}: cosine {}",
            dot / (nx * ny)
        );
    }
}

fn write_npy(path: &Path, rows: usize, cols: usize, seed: u64) {
    let mut rng = avb_core::rng::SplitMix64::new(seed);
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
    std::fs::write(path, avb_core::npy::to_bytes(rows, cols, &v)).unwrap();
}

fn nla_fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/nla")
        .join(name)
        .display()
        .to_string()
}

/// A map from the gemma3-av fixture's space (block 2) to qwen2-av's block `target_layer`, on random rows.
fn fit_tiny_map(out: &Path, lambda: &str, target_layer: &str) {
    let dir = out.parent().unwrap();
    ok(&[
        "fit-map",
        "--source",
        s(&dir.join("src.npy")),
        "--target",
        s(&dir.join("tgt.npy")),
        "-o",
        s(out),
        "--lambda",
        lambda,
        "--source-model",
        "gemma3-av",
        "--source-layer",
        "2",
        "--target-model",
        "qwen2-av",
        "--target-layer",
        target_layer,
    ]);
}

/// In `dir`: labelled random features of gemma3-av's block 2 (`features.npy`, one row per label), a ridge map
/// from there to qwen2-av's block 2 (`map.safetensors`) and a washout of qwen2-av's block 2.
fn cross_inputs(dir: &Path, labels: &[&str]) {
    let p = |n: &str| dir.join(n);
    write_npy(&p("src.npy"), 80, 64, 1);
    write_npy(&p("tgt.npy"), 80, 64, 2);
    write_npy(&p("features.npy"), labels.len(), 64, 3);
    std::fs::write(
        p("features.labels.json"),
        serde_json::to_string(labels).unwrap(),
    )
    .unwrap();
    fit_tiny_map(&p("map.safetensors"), "10", "2");
    ok(&[
        "washout",
        "--activations",
        s(&p("tgt.npy")),
        "-o",
        s(&p("washout.safetensors")),
        "--model",
        "qwen2-av",
        "--layer",
        "2",
    ]);
}

/// explain -> resume -> eval on the tiny NLA checkpoints (gemma3-av explains its own features, qwen2-av the
/// mapped ones), and the explain-time checks of maps, washouts and feature dimensions.
#[test]
fn explain_and_eval_on_tiny_verbalizers() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    cross_inputs(
        dir.path(),
        &["war and battles", "cooking", "music", "religion"],
    );
    let (gemma, qwen) = (nla_fixture("gemma3-av"), nla_fixture("qwen2-av"));
    let out = p("explanations.jsonl");
    let explain = |out: &Path| {
        vec![
            "explain".to_string(),
            "--features".into(),
            s(&p("features.npy")).into(),
            "--source-av".into(),
            gemma.clone(),
            "--target-av".into(),
            qwen.clone(),
            "--map".into(),
            s(&p("map.safetensors")).into(),
            "--washout".into(),
            s(&p("washout.safetensors")).into(),
            "--washout-weights".into(),
            "0.5,2".into(),
            "--max-new-tokens".into(),
            "6".into(),
            "--batch".into(),
            "3".into(),
            "-o".into(),
            s(out).into(),
        ]
    };
    let args = explain(&out);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = ok(&argv);
    // 4 features and 4 controls: native, cross, 2 x cross-washout, and the same for random controls.
    assert!(
        first.contains("32 explanations planned, 0 already"),
        "{first}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 32);
    let rec: serde_json::Value = serde_json::from_str(text.lines().nth(5).unwrap()).unwrap();
    assert_eq!(rec["settings"]["target_av"]["model"], "qwen2-av");
    assert_eq!(rec["settings"]["map"]["file"], "map.safetensors");
    // A torn last line (an interrupted run) is dropped and regenerated; the rest is skipped.
    let torn = &text[..text.len() - 20];
    std::fs::write(&out, torn).unwrap();
    let again = ok(&argv);
    assert!(again.contains("31 already in"), "{again}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        text,
        "resuming reproduces the greedy run"
    );
    // Other settings into the same file are refused.
    let mut other = args.clone();
    other[14] = "3".into();
    let argv2: Vec<&str> = other.iter().map(String::as_str).collect();
    fails(&argv2, "other settings");
    // eval: report, scores for both lift variants and the label scores.
    let report = p("report");
    let stdout = ok(&[
        "eval",
        "--explanations",
        s(&out),
        "-o",
        s(&report),
        "--bootstrap",
        "200",
    ]);
    assert!(stdout.contains("control-lift"), "{stdout}");
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("eval.json")).unwrap()).unwrap();
    // Random tiny models may write the same text for several features: a metric whose values are all zero is
    // listed as not summarised (with the reason) instead of failing the evaluation.
    let mut metrics: Vec<String> = ev["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}|{}",
                s["arm"]["condition"].as_str().unwrap(),
                s["metric"].as_str().unwrap()
            )
        })
        .collect();
    metrics.extend(ev["skipped"].as_array().unwrap().iter().map(|s| {
        let arm = s[0]
            .as_str()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string();
        format!("{arm}|{}", s[1].as_str().unwrap())
    }));
    for want in [
        "cross|lift",
        "cross|control-lift",
        "cross-washout|lift",
        "native|label-cosine",
        "cross|label-lift-last",
    ] {
        assert!(
            metrics.iter().any(|m| m == want),
            "{want} missing from {metrics:?}"
        );
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("cross-washout (w = 2)") && md.contains("war and battles"));
    assert!(std::fs::read_to_string(report.join("lift.svg"))
        .unwrap()
        .starts_with("<svg"));
    assert!(report.join("sweep.svg").exists());

    // AR scores of the cross explanations (the tiny qwen2 AR reads the target space), from the same inputs.
    let ar_args = |map: &Path| {
        vec![
            "eval".to_string(),
            "--explanations".into(),
            s(&out).into(),
            "-o".into(),
            s(&p("report_ar")).into(),
            "--bootstrap".into(),
            "200".into(),
            "--target-ar".into(),
            nla_fixture("qwen2-ar"),
            "--features".into(),
            s(&p("features.npy")).into(),
            "--map".into(),
            s(map).into(),
            "--washout".into(),
            s(&p("washout.safetensors")).into(),
        ]
    };
    let a1 = ar_args(&p("map.safetensors"));
    let stdout = ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stdout.contains("ar-cosine") && stdout.contains("ar-fve"),
        "{stdout}"
    );

    // Bad input: features of the wrong dimension for the map, a map whose target is not the AV's site.
    write_npy(&p("wide.npy"), 3, 65, 4);
    let mut bad = args.clone();
    bad[2] = s(&p("wide.npy")).into();
    bad[18] = s(&p("bad.jsonl")).into();
    let argv3: Vec<&str> = bad.iter().map(String::as_str).collect();
    fails(&argv3, "d = 65");
    fit_tiny_map(&p("map_l3.safetensors"), "10", "3");
    let mut bad = args.clone();
    bad[8] = s(&p("map_l3.safetensors")).into();
    bad[18] = s(&p("bad.jsonl")).into();
    let argv4: Vec<&str> = bad.iter().map(String::as_str).collect();
    fails(&argv4, "the map targets qwen2-av L3");
    ok(&[
        "washout",
        "--activations",
        s(&p("tgt.npy")),
        "-o",
        s(&p("washout_l1.safetensors")),
        "--model",
        "qwen2-av",
        "--layer",
        "1",
    ]);
    let mut bad = args.clone();
    bad[10] = s(&p("washout_l1.safetensors")).into();
    bad[18] = s(&p("bad.jsonl")).into();
    fails(
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
        "the washout is for qwen2-av L1 (d=64) but the map targets qwen2-av L2 (d=64); compute the washout",
    );
    assert!(!p("bad.jsonl").exists());
    // AR scores from a map other than the one the explanations were made with (same sites, another lambda).
    fit_tiny_map(&p("map_b.safetensors"), "20", "2");
    let a2 = ar_args(&p("map_b.safetensors"));
    fails(
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        "not the one the explanations were made from",
    );
}

/// GET `path` (with an optional Range header) from a local server; returns the status line, headers and body.
fn http_get(port: u16, path: &str, range: Option<&str>) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let range = range.map_or(String::new(), |r| format!("range: {r}\r\n"));
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: x\r\n{range}connection: close\r\n\r\n"
    )
    .unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&raw[..split]).into_owned(),
        raw[split + 4..].to_vec(),
    )
}

/// `avb site build` on the tiny qwen2-av verbalizer packed as a bundle, with mapped features of another model: the
/// pages, widgets and copies it writes, what it refuses (each with its message, nothing left behind), and
/// `avb site serve` (files, byte ranges, 404s, no escape from the site directory).
#[test]
fn site_build_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    cross_inputs(
        dir.path(),
        &["war <script>alert(1)</script>", "cooking & baking", "music"],
    );
    fit_tiny_map(&p("map_l1.safetensors"), "10", "1");
    let qwen = nla_fixture("qwen2-av");
    let bundle = p("qwen2-av");
    ok(&[
        "pack-web",
        "--model",
        &qwen,
        "--profile",
        &format!("{qwen}/nla_meta.yaml"),
        "--shard-mib",
        "1",
        "-o",
        s(&bundle),
    ]);
    let pkg = p("pkg");
    std::fs::create_dir(&pkg).unwrap();
    std::fs::write(pkg.join("avb_web.js"), "// wasm-bindgen glue").unwrap();
    std::fs::write(pkg.join("avb_web_bg.wasm"), b"\0asm").unwrap();
    let site = p("site");
    let features = p("features.npy");
    let build = |out: &Path, map: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "site",
            "build",
            "--bundle",
            s(&bundle),
            "--features",
            s(&features),
            "--pkg",
            s(&pkg),
            "--map",
            s(map),
            "-o",
            s(out),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = run(build(
        &site,
        &p("map.safetensors"),
        &[
            "--washout",
            s(&p("washout.safetensors")),
            "--washout-weight",
            "0.5",
            "--max-tokens",
            "12",
        ],
    ));
    assert!(
        stdout.contains("3 feature pages (cross, cross-washout)"),
        "{stdout}"
    );
    let read = |rel: &str| std::fs::read_to_string(site.join(rel)).unwrap();
    let page = read("features/feature-0.html");
    assert!(
        page.contains("Feature 0 — war &lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>alert"), "labels are escaped");
    assert!(
        page.contains(r#"condition="cross-washout" washout-weight="0.5" max-tokens="12""#),
        "{page}"
    );
    assert!(page.contains(
        r#"bundle="../bundle/" feature="feature-0.json" map="../artifacts/map.safetensors""#
    ));
    assert!(!page.contains("{{"), "every slot is filled");
    let index = read("index.html");
    assert!(
        index.contains(r#"<a href="features/feature-2.html">2</a></td><td>music</td>"#),
        "{index}"
    );
    assert!(index.contains("cooking &amp; baking"));
    let feature: serde_json::Value =
        serde_json::from_str(&read("features/feature-1.json")).unwrap();
    assert_eq!(feature["direction"].as_array().unwrap().len(), 64);
    assert_eq!(
        feature["model"], "gemma3-av",
        "plain direction files take the map's source site"
    );
    let meta: serde_json::Value = serde_json::from_str(&read("site.json")).unwrap();
    assert_eq!(
        meta["conditions"],
        serde_json::json!(["cross", "cross-washout"])
    );
    assert_eq!(meta["washout_weight"], 0.5);
    for f in [
        "assets/avb.js",
        "assets/av-explain.js",
        "pkg/avb_web_bg.wasm",
        "artifacts/washout.safetensors",
    ] {
        assert!(site.join(f).is_file(), "{f}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    for file in manifest["files"].as_object().unwrap().keys() {
        assert_eq!(
            std::fs::read(bundle.join(file)).unwrap(),
            std::fs::read(site.join("bundle").join(file)).unwrap()
        );
    }
    // --bundle-url links instead of copying.
    run(build(
        &p("linked"),
        &p("map.safetensors"),
        &["--bundle-url", "https://cdn.example/qwen2-av"],
    ));
    assert!(!p("linked/bundle").exists());
    assert!(std::fs::read_to_string(p("linked/features/feature-0.html"))
        .unwrap()
        .contains(r#"bundle="https://cdn.example/qwen2-av/""#));

    // Rows by HTTP range: an SAELens SAE (the default for SAEs) and a direction file on request.
    let sae = p("sae");
    std::fs::create_dir(&sae).unwrap();
    std::fs::write(
        sae.join("cfg.json"),
        serde_json::json!({"d_in": 64, "d_sae": 3,
            "metadata": {"model_name": "gemma3-av", "hook_name": "blocks.2.hook_resid_post"}})
        .to_string(),
    )
    .unwrap();
    let w_dec: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let (head, data) = avb_core::safetensors::serialize(
        &[avb_core::safetensors::TensorOut {
            name: "W_dec",
            dtype: avb_core::safetensors::Dtype::F32,
            shape: vec![3, 64],
            values: &w_dec,
        }],
        &Default::default(),
    );
    std::fs::write(sae.join("sae_weights.safetensors"), [head, data].concat()).unwrap();
    let mut from_sae = build(&p("sae-site"), &p("map.safetensors"), &["--ids", "2"]);
    from_sae[5] = s(&sae).into();
    run(from_sae);
    let page = std::fs::read_to_string(p("sae-site/features/feature-2.html")).unwrap();
    assert!(
        page.contains(r#"sae="sae_weights.safetensors" sae-cfg="cfg.json" feature-index="2""#),
        "{page}"
    );
    assert!(
        p("sae-site/features/cfg.json").is_file()
            && !p("sae-site/features/feature-2.json").exists()
    );
    assert!(
        page.contains("gemma3-av L2"),
        "the SAE's cfg.json names its site"
    );
    run(build(
        &p("range"),
        &p("map.safetensors"),
        &["--rows", "range"],
    ));
    assert!(std::fs::read_to_string(p("range/features/feature-1.html"))
        .unwrap()
        .contains(r#"sae="features.npy" feature-index="1""#));
    assert_eq!(
        std::fs::read(p("range/features/features.npy")).unwrap(),
        std::fs::read(p("features.npy")).unwrap()
    );

    // Refusals: each names the problem and the fix, and leaves no site or staging directory.
    let refuse = |args: Vec<String>, needle: &str| {
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };
    let bad = p("bad");
    refuse(build(&site, &p("map.safetensors"), &[]), "already exists");
    refuse(
        build(&bad, &p("map_l1.safetensors"), &[]),
        "the map targets qwen2-av L1",
    );
    let mut no_map = build(
        &bad,
        &p("map.safetensors"),
        &["--washout", s(&p("washout.safetensors"))],
    );
    no_map.drain(8..10);
    refuse(no_map, "--washout needs --map");
    let mut no_pkg = build(&bad, &p("map.safetensors"), &[]);
    no_pkg[7] = s(&p("nowhere")).into();
    refuse(no_pkg, "build it with `bash web/build-pkg.sh`");
    let shard = bundle.join("weights-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    refuse(
        build(&bad, &p("map.safetensors"), &[]),
        "pack the bundle again",
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("bad"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // The preview server.
    // Stopped and reaped however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_avb"))
            .args(["site", "serve", s(&site), "--port", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (head, body) = http_get(port, "/", None);
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/html"),
        "{head}"
    );
    assert_eq!(body, std::fs::read(site.join("index.html")).unwrap());
    let wasm = http_get(port, "/pkg/avb_web_bg.wasm", None).0;
    assert!(wasm.contains("application/wasm"), "{wasm}");
    let shard = std::fs::read(site.join("bundle/weights-00000.safetensors")).unwrap();
    let (head, body) = http_get(
        port,
        "/bundle/weights-00000.safetensors",
        Some("bytes=8-15"),
    );
    assert!(
        head.starts_with("HTTP/1.1 206") && head.contains(&format!("bytes 8-15/{}", shard.len())),
        "{head}"
    );
    assert_eq!(body, &shard[8..16]);
    assert!(http_get(port, "/features/feature-9.html", None)
        .0
        .starts_with("HTTP/1.1 404"));
    assert!(http_get(port, "/../site.json", None)
        .0
        .starts_with("HTTP/1.1 404"));
    assert!(http_get(port, "/features/%2e%2e/%2e%2e/features.npy", None)
        .0
        .starts_with("HTTP/1.1 404"));
    let (head, _) = http_get(port, "/index.html", Some("bytes=999999-"));
    assert!(head.starts_with("HTTP/1.1 416"), "{head}");
}

#[test]
fn bench_ridge_refuses_zero_rounds() {
    fails(
        &["bench", "ridge", "--reps", "0"],
        "--reps 0 times nothing. Fix: pass --reps 1 or more.",
    );
}

#[test]
fn bench_decode_runs_a_real_shape_and_refuses_bad_requests() {
    let out = ok(&[
        "bench",
        "decode",
        "--shape",
        "smollm2-135m",
        "--device",
        "cpu",
        "--precision",
        "q8",
        "--batch",
        "1,2",
        "--prompt",
        "4",
        "--new",
        "3",
        "--reps",
        "1",
        "--reference",
        "none",
    ]);
    assert!(
        out.contains("Shape `smollm2-135m` (0.16B parameters, 30 layers, d = 576)"),
        "{out}"
    );
    for batch in ["| 1 | ", "| 2 | "] {
        let row = out
            .lines()
            .find(|l| l.starts_with(batch))
            .expect("a row per batch");
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let tokens_per_s: f64 = cells[4].parse().unwrap();
        assert!(tokens_per_s > 0.0, "{row}");
    }
    fails(
        &["bench", "decode", "--shape", "gpt-5"],
        "unknown shape `gpt-5`; known: gemma-3-12b, gemma-3-270m, gemma-3-27b",
    );
    fails(
        &["bench", "decode", "--shape", "gemma-3-270m", "--batch", "0"],
        "--batch sizes, --prompt and --new must be at least 1",
    );
    fails(
        &[
            "bench",
            "decode",
            "--shape",
            "gemma-3-270m",
            "--reference",
            "no/such.py",
        ],
        "reference script no/such.py not found",
    );
}
