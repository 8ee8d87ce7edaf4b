//! The AV / AR protocol against its Python reference (tests/scripts/make_nla_fixtures.py: nla-protocol.md
//! re-implemented over transformers) on tiny random checkpoints with real tokenizers and chat templates.

#[path = "../../avb-runtime/tests/common/mod.rs"]
mod common;

use avb_nla::reconstructor::{ar_scores, Reconstructor};
use avb_nla::{NlaMeta, Verbalizer};
use avb_runtime::model::to_vec;
use avb_runtime::{generate, Control, GenerateOptions, Precision, Sampling};
use common::{repo_root, row_errors, test_device, Golden};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/nla")
}

fn check_av(name: &str) {
    let g = Golden::open(&fixtures().join("golden.safetensors"));
    let dir = fixtures().join(name);
    let av = Verbalizer::open(dir.to_str().unwrap(), &test_device(), Precision::F32).unwrap();
    // Tokens fed to the model and the placeholder site.
    assert_eq!(
        av.prompt.ids,
        g.ids(&format!("{name}.ids")),
        "{name}: prompt ids"
    );
    assert_eq!(
        av.prompt.sites,
        g.ids(&format!("{name}.sites"))
            .iter()
            .map(|s| *s as usize)
            .collect::<Vec<_>>(),
        "{name}: sites"
    );
    // The input embeddings with the rescaled vector in place (no sqrt(d) on Gemma's injected row).
    let (vector, _) = g.f32s(&format!("{name}.vector"));
    let input = av.input(&vector).unwrap();
    let embeds = to_vec(
        av.lm
            .model
            .residual_at_input(std::slice::from_ref(&input), 0)
            .unwrap(),
    )
    .unwrap();
    let (want, shape) = g.f32s(&format!("{name}.inputs_embeds"));
    let d = shape[1];
    let site = av.prompt.sites[0];
    // Equal up to the last bit of the fp32 norm (torch's summation order): ~1 ulp.
    let row_err = row_errors(
        &embeds[site * d..(site + 1) * d],
        &want[site * d..(site + 1) * d],
        d,
    )[0];
    assert!(row_err < 2.5e-7, "{name}: injected row rel err {row_err}");
    let worst = row_errors(&embeds, &want, d)
        .into_iter()
        .fold(0f64, f64::max);
    assert!(worst < 1e-6, "{name}: embeddings rel err {worst}");
    // What the model makes of it: last-position logits and 8 greedy tokens.
    let logits = to_vec(av.lm.model.logits(std::slice::from_ref(&input)).unwrap()).unwrap();
    let (want_logits, _) = g.f32s(&format!("{name}.last_logits"));
    let v = want_logits.len();
    let err = row_errors(&logits[logits.len() - v..], &want_logits, v)[0];
    println!(
        "{name}: {} prompt ids, site {site}, last logits rel err {err:.2e}",
        av.prompt.ids.len()
    );
    assert!(err < 1e-4, "{name}: logits rel err {err}");
    let want_greedy = g.ids(&format!("{name}.greedy"));
    let opts = GenerateOptions {
        max_new_tokens: want_greedy.len(),
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        row_seeds: None,
        max_batch: None,
    };
    let got = generate(
        &av.lm.model,
        std::slice::from_ref(&input),
        &opts,
        &mut |_, _| Control::Continue,
    )
    .unwrap();
    assert_eq!(got[0].ids, want_greedy, "{name}: greedy tokens");
    // The zero-shot profiles' site: the same vector patched into the residual stream at the input of block 2
    // (the reference uses a forward pre-hook on that decoder layer).
    let mut patched = input;
    patched.injections[0].layer = 2;
    let logits = to_vec(av.lm.model.logits(std::slice::from_ref(&patched)).unwrap()).unwrap();
    let (want_logits, _) = g.f32s(&format!("{name}.patched_last_logits"));
    let err = row_errors(&logits[logits.len() - v..], &want_logits, v)[0];
    println!("{name}: residual patch at block 2, last logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: patched logits rel err {err}");
    let got = generate(&av.lm.model, &[patched], &opts, &mut |_, _| {
        Control::Continue
    })
    .unwrap();
    assert_eq!(
        got[0].ids,
        g.ids(&format!("{name}.patched_greedy")),
        "{name}: patched greedy tokens"
    );
}

/// The browser's path (asynchronous device reads, streamed text) writes exactly what the blocking path writes.
#[test]
fn async_explanations_equal_the_blocking_ones() {
    let g = Golden::open(&fixtures().join("golden.safetensors"));
    let dir = fixtures().join("qwen2-av");
    let av = Verbalizer::open(dir.to_str().unwrap(), &test_device(), Precision::F32).unwrap();
    let (vector, _) = g.f32s("qwen2-av.vector");
    let flipped: Vec<f32> = vector.iter().map(|x| -x).collect();
    let shifted: Vec<f32> = vector
        .iter()
        .enumerate()
        .map(|(i, x)| x + (i % 7) as f32 * 0.1)
        .collect();
    let vectors = vec![vector, flipped, shifted];
    let mut opts = av.default_options();
    opts.max_new_tokens = 12;
    opts.batch_size = 2;
    let blocking = av.explain(&vectors, &opts, &mut |_, _| Ok(())).unwrap();
    let mut streamed = vec![String::new(); vectors.len()];
    let streaming =
        futures_lite::future::block_on(av.explain_async(&vectors, &opts, &mut |i, text| {
            assert!(
                text.starts_with(streamed[i].as_str()),
                "streamed text must only grow"
            );
            streamed[i] = text.to_string();
            Control::Continue
        }))
        .unwrap();
    // Two rows for three vectors: the third takes the first finished row (continuous batching) and must read
    // as it does explained alone.
    let mut alone_opts = opts.clone();
    alone_opts.batch_size = 1;
    let mut order = Vec::new();
    let alone = av
        .explain(&vectors, &alone_opts, &mut |i, _| {
            order.push(i);
            Ok(())
        })
        .unwrap();
    assert_eq!(order, [0, 1, 2], "one row finishes vectors in order");
    for (i, ((a, b), c)) in blocking.iter().zip(&streaming).zip(&alone).enumerate() {
        assert_eq!(
            (&a.raw, a.tokens, a.finish),
            (&b.raw, b.tokens, b.finish),
            "vector {i}"
        );
        assert_eq!(
            (&a.raw, a.tokens),
            (&c.raw, c.tokens),
            "vector {i} refilled vs alone"
        );
        assert!(
            a.raw.starts_with(streamed[i].as_str()),
            "vector {i}: stream is a prefix of the text"
        );
    }
    // Cancelling one explanation from the callback stops only that one.
    let cancelled =
        futures_lite::future::block_on(av.explain_async(&vectors, &opts, &mut |i, _| {
            if i == 0 {
                Control::Stop
            } else {
                Control::Continue
            }
        }))
        .unwrap();
    assert!(blocking[0].tokens > 1);
    assert_eq!((cancelled[0].finish, cancelled[0].tokens), ("cancelled", 1));
    assert_eq!(cancelled[2].raw, blocking[2].raw);
}

/// A web bundle packed with its sidecar is a verbalizer on its own (`--source-av bundle/`), and explains exactly
/// as the checkpoint does at the bundle's precision.
#[test]
fn a_bundle_with_its_sidecar_explains_like_the_checkpoint() {
    let g = Golden::open(&fixtures().join("golden.safetensors"));
    let dir = fixtures().join("qwen2-av");
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    let opts = avb_runtime::pack::PackOptions {
        sidecar: Some(std::fs::read_to_string(dir.join("nla_meta.yaml")).unwrap()),
        ..Default::default()
    };
    avb_runtime::pack::pack_web(&dir, "qwen2-av", &bundle, &opts, &mut |_, _| {}).unwrap();
    let original = Verbalizer::open(dir.to_str().unwrap(), &test_device(), Precision::Q8).unwrap();
    let packed = Verbalizer::open(bundle.to_str().unwrap(), &test_device(), Precision::Q8).unwrap();
    assert_eq!(original.prompt.ids, packed.prompt.ids);
    let (vector, _) = g.f32s("qwen2-av.vector");
    let mut opts = original.default_options();
    opts.max_new_tokens = 12;
    let a = original
        .explain(std::slice::from_ref(&vector), &opts, &mut |_, _| Ok(()))
        .unwrap();
    let b = packed
        .explain(&[vector], &opts, &mut |_, _| Ok(()))
        .unwrap();
    assert_eq!((&a[0].raw, a[0].tokens), (&b[0].raw, b[0].tokens));
}

#[test]
fn qwen2_av_protocol_matches_the_reference() {
    check_av("qwen2-av");
}

/// Gemma's template holds BOS and its tokenizer adds one too: one tokenization step must not double it.
#[test]
fn gemma3_av_protocol_matches_the_reference() {
    check_av("gemma3-av");
}

#[test]
fn ar_predictions_and_scores_match_the_reference() {
    let g = Golden::open(&fixtures().join("golden.safetensors"));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap())
            .unwrap();
    let ar =
        Reconstructor::open(&fixtures().join("qwen2-ar"), &test_device(), Precision::F32).unwrap();
    let explanations: Vec<String> = info["ar"]["explanations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    for (e, ids) in explanations
        .iter()
        .zip(info["ar"]["ids"].as_array().unwrap())
    {
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ar.input_ids(e).unwrap(), want);
    }
    // Batched (left-padded) prediction equals the reference's one-at-a-time run.
    let pred = ar.predict(&explanations, 3).unwrap();
    let (want, _) = g.f32s("ar.pred");
    let worst = row_errors(&pred.data, &want, pred.cols)
        .into_iter()
        .fold(0f64, f64::max);
    println!("AR predictions: worst rel err {worst:.2e}");
    assert!(worst < 1e-4, "AR rel err {worst}");
    let (gold, _) = g.f32s("ar.gold");
    let gold = avb_core::Matrix::new(3, pred.cols, gold);
    let scores = ar_scores(&pred, &gold, ar.meta.mse_scale()).unwrap();
    for (k, key) in ["cos", "nmse", "fve"].iter().enumerate() {
        let (want, _) = g.f32s(&format!("ar.{key}"));
        for (s, w) in scores.iter().zip(&want) {
            let got = [s.cosine, s.nmse, s.fve][k];
            assert!((got - f64::from(*w)).abs() < 1e-4, "{key}: {got} vs {w}");
        }
    }
}

fn sidecar_text(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name).join("nla_meta.yaml")).unwrap()
}

#[test]
fn bad_sidecars_are_refused_with_the_reason() {
    let path = PathBuf::from("nla_meta.yaml");
    let good = sidecar_text("qwen2-av");
    assert!(NlaMeta::from_yaml(&good, &path).is_ok());
    let future = good.replace("schema_version: 2", "schema_version: 3");
    let err = NlaMeta::from_yaml(&future, &path).unwrap_err().to_string();
    assert!(err.contains("schema_version") && err.contains("3"), "{err}");
    let no_site = good.replace("<concept>{injection_char}</concept>", "<concept></concept>");
    let err = NlaMeta::from_yaml(&no_site, &path).unwrap_err().to_string();
    assert!(err.contains("{injection_char}"), "{err}");
    let err = NlaMeta::from_yaml("kind: [", &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("YAML"), "{err}");
    let bad_scale = good.replace("injection_scale: 150.0", "injection_scale: half");
    let err = NlaMeta::from_yaml(&bad_scale, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("injection_scale"), "{err}");
}

#[test]
fn a_sidecar_whose_neighbours_do_not_match_finds_no_site() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("qwen2-av");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let text = sidecar_text("qwen2-av");
    let meta = NlaMeta::from_yaml(&text, &PathBuf::from("x")).unwrap();
    let left = meta.tokens.injection_left_neighbor_id.unwrap();
    let wrong = text.replace(
        &format!("injection_left_neighbor_id: {left}"),
        &format!("injection_left_neighbor_id: {}", left + 1),
    );
    std::fs::write(dir.path().join("nla_meta.yaml"), wrong).unwrap();
    let err = Verbalizer::open(dir.path().to_str().unwrap(), &test_device(), Precision::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("0 placeholder site"), "{err}");
    // A vector of the wrong dimension for the AV.
    let av = Verbalizer::open(src.to_str().unwrap(), &test_device(), Precision::F32).unwrap();
    let err = av.input(&vec![1.0; 65]).unwrap_err().to_string();
    assert!(err.contains("d_model 64"), "{err}");
}
