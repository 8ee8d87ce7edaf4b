//! Reading golden safetensors fixtures (float and int64 tensors) and comparing outputs.
#![allow(dead_code)]

use avb_core::io::{FileSource, RangeSource};
use avb_core::safetensors::{self, Header};
use std::path::Path;

pub struct Golden {
    src: FileSource,
    header: Header,
}

impl Golden {
    pub fn open(path: &Path) -> Golden {
        let src = FileSource::open(path).unwrap();
        let header = Header::read(&src).unwrap();
        Golden { src, header }
    }
    fn bytes(&self, name: &str) -> (Vec<u8>, Vec<usize>) {
        let t = self.header.tensor(&self.src, name).unwrap();
        let bytes = self
            .src
            .read_vec(t.start, (t.end - t.start) as usize)
            .unwrap();
        (bytes, t.shape.clone())
    }
    pub fn f32s(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let dtype = self.header.tensor(&self.src, name).unwrap().dtype;
        let (bytes, shape) = self.bytes(name);
        let mut out = Vec::new();
        safetensors::decode_f32(dtype, &bytes, &mut out);
        (out, shape)
    }
    pub fn i64s(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let (bytes, shape) = self.bytes(name);
        let v = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, shape)
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64s(name).0.iter().map(|v| *v as u32).collect()
    }
}

/// ||a - b|| / ||b|| for each row of `width`.
pub fn row_errors(a: &[f32], b: &[f32], width: usize) -> Vec<f64> {
    assert_eq!(a.len(), b.len());
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let num: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2))
                .sum();
            let den: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum();
            (num / den.max(1e-30)).sqrt()
        })
        .collect()
}

/// Cosine similarity of each row of `width`.
pub fn row_cosines(a: &[f32], b: &[f32], width: usize) -> Vec<f64> {
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny).max(1e-30)
        })
        .collect()
}

/// The repository root: `AVB_REPO_ROOT` when the test binary runs away from its build tree (the GPU machine),
/// else the one it was built in.
pub fn repo_root() -> std::path::PathBuf {
    std::env::var_os("AVB_REPO_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The backend the parity tests run on: `AVB_TEST_DEVICE` = cpu (default), wgpu or cuda (the latter two need the
/// crate's `wgpu` / `cuda` features).
pub fn test_device() -> avb_runtime::Device {
    let want = std::env::var("AVB_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match want.as_str() {
        "cpu" => avb_runtime::Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu" => avb_runtime::Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => avb_runtime::Device::cuda(0),
        other => {
            panic!("AVB_TEST_DEVICE={other}: not compiled in (features wgpu / cuda) or unknown")
        }
    }
}
