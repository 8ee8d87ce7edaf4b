//! GGUF parsing and dequantization against gguf-py (tests/scripts/make_gguf_fixture.py), plus truncated and
//! corrupt headers.

use avb_core::io::{BytesSource, FileSource};
use avb_core::npy;
use avb_model::gguf::{Gguf, MetaValue};
use avb_model::quant::GgmlType;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

#[test]
fn metadata_of_every_value_type() {
    let src = FileSource::open(&fixture("types.gguf")).unwrap();
    let g = Gguf::read(&src).unwrap();
    assert_eq!(g.version, 3);
    let exp = expected();
    for (key, want) in exp["metadata"].as_object().unwrap() {
        let got = g.meta(key).unwrap_or_else(|| panic!("missing {key}"));
        match want {
            serde_json::Value::String(s) => assert_eq!(got.as_str(), Some(s.as_str()), "{key}"),
            serde_json::Value::Bool(b) => assert_eq!(got, &MetaValue::Bool(*b), "{key}"),
            serde_json::Value::Array(items) => {
                let arr = got.as_array().unwrap();
                assert_eq!(arr.len(), items.len(), "{key}");
                for (a, w) in arr.iter().zip(items) {
                    match w {
                        serde_json::Value::String(s) => assert_eq!(a.as_str(), Some(s.as_str())),
                        _ => assert_eq!(a.as_i64(), w.as_i64()),
                    }
                }
            }
            n if n.is_i64() || n.is_u64() => {
                assert_eq!(got.as_f64().unwrap(), n.as_f64().unwrap(), "{key}")
            }
            n => assert_eq!(got.as_f64().unwrap(), n.as_f64().unwrap(), "{key}"),
        }
    }
    assert!(matches!(g.meta("test.u16"), Some(MetaValue::U16(60000))));
    assert!(matches!(g.meta("test.i64"), Some(MetaValue::I64(v)) if *v == -(1i64 << 60)));
    assert_eq!(
        g.meta("general.architecture").and_then(|v| v.as_str()),
        Some("avbtest")
    );
}

#[test]
fn every_tensor_type_dequantizes_like_gguf_py() {
    let src = FileSource::open(&fixture("types.gguf")).unwrap();
    let g = Gguf::read(&src).unwrap();
    let exp = expected();
    let tensors = exp["tensors"].as_object().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for (name, info) in tensors {
        let t = g.tensor(name).unwrap();
        assert_eq!(t.ty.name(), info["type"].as_str().unwrap());
        assert_eq!(t.shape(), vec![3, 512]);
        assert_eq!(t.start % g.alignment, 0);
        let want_src = FileSource::open(&fixture(&format!(
            "{}.npy",
            info["type"].as_str().unwrap().to_lowercase()
        )))
        .unwrap();
        let (_, _, want) = npy::read_all(&want_src).unwrap();
        let got = g.read_f32(&src, name).unwrap();
        assert_eq!(got.len(), want.len());
        // gguf-py computes in float32 with numpy; allow one rounding of the scale products.
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{name}[{i}]: {a} vs {b}"
            );
        }
        // A row read touches only that row and agrees with the whole-tensor read.
        assert_eq!(
            g.read_rows_f32(&src, t, 2, 1).unwrap(),
            got[1024..].to_vec()
        );
    }
    assert_eq!(GgmlType::Q6K.block(), (256, 210));
}

fn err<T: std::fmt::Debug>(r: avb_core::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn truncated_and_corrupt_headers_are_refused() {
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let read = |b: Vec<u8>| Gguf::read(&BytesSource::new("m.gguf", b));
    // Cut anywhere in the header or data: an error, never a panic.
    for cut in [0, 3, 7, 20, 100, 1000, bytes.len() / 2, bytes.len() - 100] {
        let e = err(read(bytes[..cut].to_vec()));
        assert!(
            e.contains("m.gguf") && (e.contains("truncated") || e.contains("ends inside")),
            "cut {cut}: {e}"
        );
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(err(read(bad)).contains("missing the GGUF magic"));
    let mut v9 = bytes.clone();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(err(read(v9)).contains("GGUF version 9"));
    let mut huge = bytes.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(read(huge)).contains("implausible counts"));
    // An unknown metadata value type in the first entry (its type field follows the key string).
    let key_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let mut unk = bytes.clone();
    unk[32 + key_len..36 + key_len].copy_from_slice(&77u32.to_le_bytes());
    assert!(err(read(unk)).contains("unknown value type 77"));
}
