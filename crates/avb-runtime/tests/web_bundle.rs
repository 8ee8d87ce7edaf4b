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
        max_batch: None,
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
    for family in ["qwen2-av", "gemma3-av"] {
        for (bits, precision) in [(Bits::Q8, Precision::Q8), (Bits::Q4, Precision::Q4)] {
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

/// The browser's cross-model step runs on the device (`DeviceMap`); it must give the host planner's vectors: the
/// map's linear part (`AffineMap::apply`) and the washout blend (`washout::mix`), and refuse what `mix` refuses.
#[test]
fn device_cross_step_equals_the_host_planner() {
    use avb_core::matrix::Matrix;
    use avb_core::ridge::AffineMap;
    use avb_core::rng::SplitMix64;
    use avb_core::washout::mix;
    use avb_runtime::cross::{checked_rows, DeviceMap};

    let (d_src, d_tgt, rows) = (48, 80, 5);
    let mut rng = SplitMix64::new(7);
    let mut draw = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let map = AffineMap {
        weight: Matrix::new(d_src, d_tgt, draw(d_src * d_tgt)),
        bias: draw(d_tgt),
    };
    // A washout vector is a mean of unit rows: norm below one, a common offset in every coordinate.
    let washout: Vec<f32> = draw(d_tgt).iter().map(|v| 0.02 * v + 0.05).collect();
    let directions = Matrix::new(rows, d_src, draw(rows * d_src));
    let device = common::test_device();
    let dm = DeviceMap::new(&map, Some(&washout), &device).unwrap();
    let host_mapped = map.apply(&directions, false).unwrap();
    for weight in [None, Some(0.5), Some(2.0)] {
        let ours = checked_rows(
            to_vec(dm.vectors(&directions, weight).unwrap().unsqueeze()).unwrap(),
            d_tgt,
        )
        .unwrap();
        for (i, row) in ours.iter().enumerate() {
            let host = match weight {
                None => host_mapped.row(i).to_vec(),
                Some(w) => mix(host_mapped.row(i), &washout, w).unwrap(),
            };
            let err = common::row_errors(row, &host, d_tgt)[0];
            println!("washout weight {weight:?}, row {i}: relative error {err:.2e}");
            assert!(err < 1e-5, "row {i} at weight {weight:?}: {err}");
        }
    }
    // A zero direction has no direction to blend: the host refuses it, and so must the device path.
    let zero = Matrix::zeros(1, d_src);
    let err = checked_rows(
        to_vec(dm.vectors(&zero, Some(1.0)).unwrap().unsqueeze()).unwrap(),
        d_tgt,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("zero or non-finite"), "{err}");
    assert!(mix(&[0.0f32; 80], &washout, 1.0).is_err());
    // Directions of another width, a washout of another width, a blend without a washout.
    let err = dm
        .vectors(&Matrix::zeros(1, d_src + 1), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("d_src = 48"), "{err}");
    let err = DeviceMap::new(&map, Some(&washout[1..]), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("target has d = 80"), "{err}");
    let plain = DeviceMap::new(&map, None, &device).unwrap();
    let err = plain
        .vectors(&directions, Some(1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a washout vector"), "{err}");
}

/// avbridge's own kernels (quantized matvec, RMSNorm, decode attention; on GPU backends) must compute what burn's
/// generic ops compute: logits of short prompts (few rows: the matvec path) and of a padded batch within float
/// rounding, and the same greedy tokens through the KV cache (the decode-attention path). On the CPU backend the
/// kernels do not apply and both runs take the generic path.
#[test]
fn own_kernels_match_burns_generic_ops() {
    for family in ["qwen2-av", "gemma3-av"] {
        for precision in [Precision::F32, Precision::Q8, Precision::Q4] {
            let mut m = open(&nla_fixture(family), precision);
            let ids = prompt_ids(&m, "Describe the vector.");
            let short = Input::ids(ids[..5].to_vec());
            let batch = [Input::ids(ids.clone()), Input::ids(ids[3..].to_vec())];
            let run = |m: &LoadedModel| {
                let short_logits =
                    to_vec(m.model.logits(std::slice::from_ref(&short)).unwrap()).unwrap();
                let batch_logits = to_vec(m.model.logits(&batch).unwrap()).unwrap();
                (short_logits, batch_logits, greedy(m, ids.clone(), 12))
            };
            let (fused_short, fused_batch, fused_tokens) = run(&m);
            m.model.set_kernels(false);
            let (short_logits, batch_logits, tokens) = run(&m);
            let (e1, e2) = (
                rel_diff(&fused_short, &short_logits),
                rel_diff(&fused_batch, &batch_logits),
            );
            println!("{family} {precision:?}: kernels vs generic ops: short prompt {e1:.2e}, padded batch {e2:.2e}, greedy {fused_tokens:?}");
            assert!(e1 < 1e-4 && e2 < 1e-4, "{family} {precision:?}: {e1} {e2}");
            assert_eq!(fused_tokens, tokens, "{family} {precision:?}");
        }
    }
}
