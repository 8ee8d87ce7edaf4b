//! Shared helpers for the core crate's integration tests.
#![allow(dead_code)]

use avb_core::io::FileSource;
use avb_core::{npy, Matrix};
use std::path::PathBuf;

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

pub fn golden_json() -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir().join("golden.json"))
        .expect("golden.json (run tests/scripts/make_golden.py)");
    serde_json::from_str(&text).unwrap()
}

pub fn load(name: &str) -> Matrix {
    let src = FileSource::open(&golden_dir().join(format!("{name}.npy"))).unwrap();
    let (r, c, v) = npy::read_all(&src).unwrap();
    Matrix::new(r, c, v)
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// ||a - b|| / ||b||
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn assert_close(actual: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tol,
        "{what}: got {actual}, expected {expected} (tolerance {tol})"
    );
}

pub fn assert_rel(actual: f64, expected: f64, tol: f64, what: &str) {
    let err = (actual - expected).abs() / expected.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= tol,
        "{what}: got {actual:e}, expected {expected:e} (relative error {err:e} > {tol:e})"
    );
}
