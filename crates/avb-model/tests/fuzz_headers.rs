//! Mutation fuzzing of every header reader (GGUF, safetensors, avbridge artifacts, .npy): random byte flips,
//! boundary values written over length fields, truncations and splices of real files, each parsed and, when the
//! parse succeeds, read in full. Nothing may panic. CI runs it for a few seconds; for a long run:
//! `AVB_FUZZ_SECONDS=600 cargo test --release -p avb-model --test fuzz_headers -- --nocapture`.

use avb_core::artifact::{self, ActivationSetMeta, Artifact, Body, CorpusRef, NamedTensor, Space};
use avb_core::io::{BytesSource, RangeSource};
use avb_core::npy;
use avb_core::rng::SplitMix64;
use avb_core::safetensors::{self, Dtype, Header};
use avb_model::gguf::Gguf;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn seeds() -> Vec<Vec<u8>> {
    let gguf = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/types.gguf"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    let values: Vec<f32> = (0..6 * 40).map(|i| i as f32 * 0.5).collect();
    let body = Body::ActivationSet(ActivationSetMeta {
        space: Space {
            model: "m".into(),
            layer: Some(1),
            d: 40,
        },
        pooling: "mean".into(),
        corpus: CorpusRef {
            id: "c".into(),
            sha256: "0".repeat(64),
        },
        row_ids: (0..6).map(|i| format!("r{i}")).collect(),
    });
    artifact::write(
        &p,
        body,
        "fuzz",
        Dtype::F16,
        &[NamedTensor {
            name: "activations",
            shape: vec![6, 40],
            values: &values,
        }],
    )
    .unwrap();
    let art = std::fs::read(&p).unwrap();
    vec![gguf, art, npy::to_bytes(6, 40, &values)]
}

fn mutate(rng: &mut SplitMix64, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(6) {
        if b.is_empty() {
            break;
        }
        let at = rng.below(b.len());
        match rng.below(6) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'{', b'"'][rng.below(6)],
            2 => {
                // A boundary value over what may be a length or count field.
                let v: u64 = [
                    0,
                    1,
                    0xffff_ffff,
                    u64::MAX,
                    b.len() as u64,
                    (b.len() as u64) << 1,
                ][rng.below(6)];
                let bytes = v.to_le_bytes();
                let n = if rng.below(2) == 0 { 4 } else { 8 }.min(b.len() - at);
                b[at..at + n].copy_from_slice(&bytes[..n]);
            }
            3 => b.truncate(at),
            4 => {
                let len = rng.below(64).min(b.len() - at);
                let chunk = b[at..at + len].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, chunk);
            }
            _ => {
                let len = rng.below(32).min(b.len() - at);
                b.drain(at..at + len);
            }
        }
    }
    b
}

/// Parse with every reader and read whatever parses. Errors are fine; panics are not.
fn exercise(bytes: Vec<u8>) {
    let src = BytesSource::new("fuzz.bin", bytes);
    if let Ok(g) = Gguf::read(&src) {
        for t in &g.tensors {
            let _ = g.read_f32(&src, &t.name);
        }
    }
    if let Ok(h) = Header::read(&src) {
        for info in h.tensors.values() {
            let rows = info.rows_cols().map_or(0, |(r, _)| r);
            let _ = safetensors::read_rows(&src, info, 0, rows);
        }
    }
    if let Ok(info) = npy::read_header(&src) {
        let _ = npy::read_all(&src);
        let _ = info.numel();
    }
    let copy = BytesSource::new(
        "fuzz.bin",
        src.read_vec(0, src.len() as usize).unwrap_or_default(),
    );
    if let Ok(a) = Artifact::from_source(Box::new(copy)) {
        let _ = a.verify();
        for name in a.header.tensors.keys().cloned().collect::<Vec<_>>() {
            let _ = a.read_tensor(&name);
            let _ = a.read_rows(&name, 0, 1);
        }
    }
}

#[test]
fn header_readers_never_panic_on_mutated_files() {
    let seconds: u64 = std::env::var("AVB_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seeds = seeds();
    for s in &seeds {
        exercise(s.clone());
    }
    let mut rng = SplitMix64::new(
        std::env::var("AVB_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        let keep = input.clone();
        if std::panic::catch_unwind(|| exercise(input)).is_err() {
            let path = std::env::temp_dir().join(format!("avb-fuzz-crash-{cases}.bin"));
            std::fs::write(&path, keep).unwrap();
            panic!(
                "a reader panicked on case {cases}; input saved to {}",
                path.display()
            );
        }
        cases += 1;
    }
    eprintln!("fuzzed {cases} mutated files in {seconds} s");
    assert!(cases > 100, "only {cases} cases ran");
}
