//! Hugging Face checkpoint directories: single file, shards with an index, f32/f16/bf16, and the failure cases.

use avb_core::safetensors::{serialize, Dtype, TensorOut};
use avb_model::checkpoint::Checkpoint;
use std::collections::BTreeMap;
use std::path::Path;

fn values(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - 7.0) * k).collect()
}

fn shard(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let outs: Vec<TensorOut> = tensors
        .iter()
        .map(|(n, d, s, v)| TensorOut {
            name: n,
            dtype: *d,
            shape: s.clone(),
            values: v,
        })
        .collect();
    let (h, d) = serialize(&outs, &BTreeMap::new());
    std::fs::write(path, [h, d].concat()).unwrap();
}

fn config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1}"#,
    )
    .unwrap();
}

fn err<T>(r: avb_core::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_checkpoint_reads_across_shards_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d);
    shard(
        &d.join("model-00001-of-00002.safetensors"),
        &[
            ("embed.weight", Dtype::BF16, vec![4, 8], values(32, 0.5)),
            ("norm.weight", Dtype::F32, vec![8], values(8, 0.25)),
        ],
    );
    shard(
        &d.join("model-00002-of-00002.safetensors"),
        &[("lm_head.weight", Dtype::F16, vec![4, 8], values(32, 0.125))],
    );
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 200}, "weight_map": {"embed.weight": "model-00001-of-00002.safetensors", "norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let ck = Checkpoint::open(d).unwrap();
    assert_eq!(
        ck.tensor_names().collect::<Vec<_>>(),
        ["embed.weight", "lm_head.weight", "norm.weight"]
    );
    assert_eq!(ck.config_usize("hidden_size").unwrap(), 8);
    // Values chosen to be exact in bf16/f16.
    assert_eq!(
        ck.read_f32("embed.weight", &[4, 8]).unwrap(),
        values(32, 0.5)
    );
    assert_eq!(
        ck.read_f32("lm_head.weight", &[4, 8]).unwrap(),
        values(32, 0.125)
    );
    assert_eq!(ck.read_f32("norm.weight", &[8]).unwrap(), values(8, 0.25));
    assert!(err(ck.read_f32("norm.weight", &[9])).contains("shape [8] but the config implies [9]"));
    assert!(err(ck.read_f32("missing.weight", &[1])).contains("tensor `missing.weight` is missing"));
    assert!(err(ck.config_usize("vocab_size")).contains("no integer `vocab_size`"));

    // The index names a tensor its shard does not hold.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"embed.weight": "model-00002-of-00002.safetensors", "norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert!(err(Checkpoint::open(d))
        .contains("the index puts `embed.weight` in model-00002-of-00002.safetensors"));
    // A shard is missing.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "model-00003-of-00003.safetensors"}}"#,
    )
    .unwrap();
    assert!(err(Checkpoint::open(d)).contains("shard model-00003-of-00003.safetensors is missing"));
    // A shard name that escapes the directory.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "../evil.safetensors"}}"#,
    )
    .unwrap();
    assert!(err(Checkpoint::open(d)).contains("not a plain file name"));
}

#[test]
fn single_file_checkpoint_and_its_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(err(Checkpoint::open(d)).contains("config.json: cannot read"));
    config(d);
    assert!(err(Checkpoint::open(d)).contains("shard model.safetensors is missing"));
    shard(
        &d.join("model.safetensors"),
        &[("w", Dtype::F32, vec![2, 3], values(6, 1.0))],
    );
    let ck = Checkpoint::open(d).unwrap();
    assert_eq!(ck.read_f32("w", &[2, 3]).unwrap(), values(6, 1.0));
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 4]).unwrap();
    assert!(err(Checkpoint::open(d)).contains("truncated"));
    std::fs::write(d.join("config.json"), "{not json").unwrap();
    assert!(err(Checkpoint::open(d)).contains("not valid JSON"));
}
