//! Broken models and bad requests give errors that name the problem; nothing panics.

use avb_runtime::{Device, Injection, Input, Model};
use std::path::{Path, PathBuf};

fn tiny(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(family)
}

/// A copy of a tiny checkpoint with config.json edited by `edit`.
fn edited(family: &str, dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join(family);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        tiny(family).join("model.safetensors"),
        out.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny(family).join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    out
}

fn load_err(path: &Path) -> String {
    match Model::load(path, &Device::flex()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, needle: &str) {
    assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
}

#[test]
fn broken_checkpoints_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = edited("qwen2", &dir.path().join("a"), |c| {
        c["model_type"] = "mamba".into()
    });
    assert_mentions(&load_err(&unknown), "model_type `mamba`");

    let missing = edited("llama", &dir.path().join("b"), |c| {
        c["num_hidden_layers"] = 5.into()
    });
    assert_mentions(&load_err(&missing), "missing");

    let wrong_shape = edited("gemma3", &dir.path().join("c"), |c| {
        c["intermediate_size"] = 100.into()
    });
    assert_mentions(&load_err(&wrong_shape), "config implies");

    let bad_heads = edited("qwen2", &dir.path().join("d"), |c| {
        c["num_key_value_heads"] = 3.into()
    });
    assert_mentions(&load_err(&bad_heads), "key/value heads");

    let bad_rope = edited("llama", &dir.path().join("e"), |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4})
    });
    assert_mentions(&load_err(&bad_rope), "RoPE scaling `yarn`");

    let truncated = edited("qwen2", &dir.path().join("f"), |_| {});
    let weights = truncated.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_mentions(&load_err(&truncated), "truncated");

    let gguf = dir.path().join("cut.gguf");
    let src =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/types.gguf");
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 3]).unwrap();
    let msg = load_err(&gguf);
    println!("{msg}");
    assert!(
        msg.contains("truncated") || msg.contains("corrupt"),
        "{msg}"
    );

    let not_a_model = dir.path().join("types.gguf");
    std::fs::write(&not_a_model, &bytes).unwrap();
    assert_mentions(&load_err(&not_a_model), "GGUF architecture");
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let model = Model::load(&tiny("gemma3"), &Device::flex()).unwrap();
    let c = &model.config;
    let err = |r: avb_core::Result<burn::tensor::Tensor<3>>| match r {
        Ok(_) => panic!("request should fail"),
        Err(e) => e.to_string(),
    };
    let ids = Input::ids(vec![2, 10, 11, 12]);
    assert_mentions(
        &err(model.forward_to(std::slice::from_ref(&ids), c.num_layers, None)),
        "out of range",
    );
    assert_mentions(
        &err(model.forward_to(&[Input::ids(vec![2, 9999])], 0, None)),
        "outside the vocabulary",
    );
    assert_mentions(
        &err(model.forward_to(&[Input::ids(vec![])], 0, None)),
        "empty",
    );
    let mut wrong_dim = ids.clone();
    wrong_dim.injections.push(Injection {
        layer: 0,
        position: 1,
        vector: vec![0.5; c.hidden_size + 1],
    });
    assert_mentions(&err(model.logits(&[wrong_dim])), "hidden size");
    let mut past_end = ids.clone();
    past_end.injections.push(Injection {
        layer: 0,
        position: 4,
        vector: vec![0.5; c.hidden_size],
    });
    assert_mentions(&err(model.logits(&[past_end])), "position 4");
    let mut nan = ids;
    nan.injections.push(Injection {
        layer: 0,
        position: 1,
        vector: vec![f32::NAN; c.hidden_size],
    });
    assert_mentions(&err(model.logits(&[nan])), "non-finite");
}
