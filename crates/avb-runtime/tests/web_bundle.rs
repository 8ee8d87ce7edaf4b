//! Web bundles (`avb pack-web`): a bundle must run exactly the model the runtime builds from the original weights
//! at the same precision (same quantized values, same tokenizer and chat template), and every damaged or
//! mismatched bundle must be refused with a message that names the problem.

mod common;

use avb_model::bundle::{Bits, Manifest};
use avb_model::chat::Message;
use avb_model::registry;
use avb_runtime::loader::{self, LoadedModel};
use avb_runtime::model::to_vec;
use avb_runtime::pack::{pack_web, PackOptions};
use avb_runtime::{generate, Control, GenerateOptions, Input, Precision, Sampling};
use std::path::{Path, PathBuf};

fn nla_fixture(name: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/nla").join(name)
}

fn pack(src: &Path, out: &Path, bits: Bits, shard_bytes: u64) -> avb_core::Result<Manifest> {
    let opts = PackOptions {
        bits,
        shard_bytes,
        ..PackOptions::default()
    };
    pack_web(src, "test", out, &opts, &mut |_, _| {})
}

fn open(path: &Path, precision: Precision) -> LoadedModel {
    loader::open(path.to_str().unwrap(), &common::test_device(), precision).unwrap()
}

fn greedy(m: &LoadedModel, ids: Vec<u32>, n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_ids: Vec::new(),
        row_seeds: None,
    };
    let out = generate(&m.model, &[Input::ids(ids)], &opts, &mut |_, _| {
        Control::Continue
    })
    .unwrap();
    out[0].ids.clone()
}

fn prompt_ids(m: &LoadedModel, text: &str) -> Vec<u32> {
    let rendered = match &m.chat {
        Some(t) => t.render(&[Message::new("user", text)], true).unwrap(),
        None => text.to_string(),
    };
    m.tokenizer.encode(&rendered, true).unwrap()
}

/// Relative max-abs difference of two logit vectors.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale
}

#[test]
fn tiny_bundles_reproduce_the_runtime_quantized_model() {
    let on_cpu = std::env::var("AVB_TEST_DEVICE").map_or(true, |d| d == "cpu");
    for family in ["qwen2-av", "gemma3-av"] {
        for (bits, precision) in [(Bits::Q8, Precision::Q8), (Bits::Q4, Precision::Q4)] {
            // burn-cubecl's 4-bit matmul does not run on GPUs yet (the runtime refuses it).
            if bits == Bits::Q4 && !on_cpu {
                continue;
            }
            let src = nla_fixture(family);
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("bundle");
            // Small shards so that tensors split into several parts across several files.
            let manifest = pack(&src, &out, bits, 16 << 10).unwrap();
            let multi_part = manifest
                .tensors
                .values()
                .filter(|t| t.parts.len() > 1)
                .count();
            assert!(
                manifest.files.len() > 3,
                "{family}: expected several shards"
            );
            assert!(multi_part > 0, "{family}: expected a tensor split in parts");

            let original = open(&src, precision);
            let bundled = open(&out, precision);
            let text = "Explain the concept in one sentence, please.";
            let ids = prompt_ids(&original, text);
            assert_eq!(
                ids,
                prompt_ids(&bundled, text),
                "{family}: prompt ids differ"
            );

            let input = [Input::ids(ids.clone())];
            let want = to_vec(original.model.logits(&input).unwrap()).unwrap();
            let got = to_vec(bundled.model.logits(&input).unwrap()).unwrap();
            let err = rel_diff(&got, &want);
            println!(
                "{family} {bits:?}: {} files, logits rel max diff {err:.2e}",
                manifest.files.len()
            );
            // Same quantized values; scales may differ in the last ulp after the round trip through f32.
            assert!(err < 1e-5, "{family} {bits:?}: logits differ by {err}");
            assert_eq!(
                greedy(&bundled, ids.clone(), 12),
                greedy(&original, ids, 12),
                "{family} {bits:?}: greedy tokens differ"
            );
        }
    }
}

#[test]
fn real_model_bundle_generates_what_the_original_generates() {
    let path = registry::ensure("smollm2-135m-instruct").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-q8");
    let manifest = pack(&path, &out, Bits::Q8, 64 << 20).unwrap();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    println!(
        "smollm2-135m-instruct q8 bundle: {} files, {:.1} MiB (GGUF Q4_1 {:.1} MiB)",
        manifest.files.len(),
        bytes as f64 / (1 << 20) as f64,
        std::fs::metadata(&path).unwrap().len() as f64 / (1 << 20) as f64
    );
    let original = open(&path, Precision::Q8);
    let bundled = open(&out, Precision::Q8);
    let ids = prompt_ids(&original, "What is the capital of France?");
    assert_eq!(ids, prompt_ids(&bundled, "What is the capital of France?"));
    let want = greedy(&original, ids.clone(), 32);
    let got = greedy(&bundled, ids, 32);
    println!("greedy: {:?}", bundled.tokenizer.decode(&got));
    assert_eq!(
        got, want,
        "the bundle's greedy continuation differs from the original's at q8"
    );
}

fn expect_err<T>(r: avb_core::Result<T>, needle: &str) {
    match r {
        Ok(_) => panic!("expected an error containing `{needle}`"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`");
        }
    }
}

fn open_err(path: &Path) -> avb_core::Result<LoadedModel> {
    loader::open(
        path.to_str().unwrap(),
        &common::test_device(),
        Precision::Q8,
    )
}

/// A fresh copy of a packed tiny bundle to damage.
fn damaged_copy(packed: &Path, tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(packed).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

#[test]
fn damaged_bundles_are_refused_with_the_reason() {
    let src = nla_fixture("qwen2-av");
    let tmp = tempfile::tempdir().unwrap();
    let packed = tmp.path().join("packed");
    pack(&src, &packed, Bits::Q8, 16 << 10).unwrap();
    let shard = "weights-00000.safetensors";

    expect_err(pack(&src, &packed, Bits::Q8, 16 << 10), "already exists");
    expect_err(
        pack(&packed, &tmp.path().join("again"), Bits::Q8, 16 << 10),
        "already a web bundle",
    );

    let flipped = damaged_copy(&packed, tmp.path(), "flipped");
    let mut bytes = std::fs::read(flipped.join(shard)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(flipped.join(shard), &bytes).unwrap();
    expect_err(
        open_err(&flipped),
        "sha256 mismatch for weights-00000.safetensors",
    );

    let truncated = damaged_copy(&packed, tmp.path(), "truncated");
    std::fs::write(truncated.join(shard), &bytes[..bytes.len() / 2]).unwrap();
    expect_err(open_err(&truncated), "but the manifest says");

    let missing = damaged_copy(&packed, tmp.path(), "missing");
    std::fs::remove_file(missing.join(shard)).unwrap();
    expect_err(open_err(&missing), "weights-00000.safetensors is missing");

    let future = damaged_copy(&packed, tmp.path(), "future");
    let manifest = std::fs::read_to_string(future.join("manifest.json")).unwrap();
    std::fs::write(
        future.join("manifest.json"),
        manifest.replace("\"schema_version\": 1", "\"schema_version\": 99"),
    )
    .unwrap();
    expect_err(open_err(&future), "bundle schema_version 99");

    let foreign = damaged_copy(&packed, tmp.path(), "foreign");
    std::fs::write(
        foreign.join("manifest.json"),
        "{\"format\": \"something-else\"}",
    )
    .unwrap();
    expect_err(open_err(&foreign), "not an avbridge web bundle manifest");

    // A checkpoint whose config does not match its tensors fails mid-pack: nothing is left behind.
    let bad_src = damaged_copy(&src, tmp.path(), "bad-src");
    let config = std::fs::read_to_string(bad_src.join("config.json")).unwrap();
    std::fs::write(
        bad_src.join("config.json"),
        config.replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let before: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    expect_err(
        pack(&bad_src, &tmp.path().join("never"), Bits::Q8, 16 << 10),
        "but the config implies",
    );
    let after: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(before.len(), after.len(), "a failed pack left files behind");
}
