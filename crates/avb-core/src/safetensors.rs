//! The safetensors container (HF format): 8-byte little-endian header length, a JSON header mapping tensor
//! names to dtype/shape/offsets (plus an optional string map `__metadata__`), then the raw little-endian data.
//! Parsing is strict: every offset is bounds-checked and the data region must be covered exactly, so a
//! truncated or tampered file is reported, never mis-read.

use crate::error::{AvbError, Result};
use crate::io::RangeSource;
use std::collections::BTreeMap;

/// Headers larger than this are refused (the reference implementation uses the same 100 MB bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    /// Integer payloads of avbridge's quantized web bundles.
    I8,
    U8,
    /// Any other safetensors dtype (integers, bool, fp8): legal in the container, not readable as floats.
    Other(usize),
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F64 => 8,
            Dtype::I8 | Dtype::U8 => 1,
            Dtype::Other(size) => size,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Other(_) => "non-float",
        }
    }
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::F64,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => Dtype::Other(1),
            "I16" | "U16" => Dtype::Other(2),
            "I32" | "U32" => Dtype::Other(4),
            "I64" | "U64" => Dtype::Other(8),
            _ => return None,
        })
    }
}

/// Decode little-endian floats of `dtype` into f32.
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32),
        ),
        Dtype::I8 | Dtype::U8 | Dtype::Other(_) => {}
    }
}

/// Encode f32 values as little-endian `dtype` (F32 or F16).
pub fn encode_f32(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|v| (*v as f64).to_le_bytes())
            .collect(),
        Dtype::I8 | Dtype::U8 | Dtype::Other(_) => {
            unreachable!(
                "float writers emit float dtypes; integer payloads go through serialize_bytes"
            )
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Rows and columns of a 1-D (as one row) or 2-D tensor.
    pub fn rows_cols(&self) -> Option<(usize, usize)> {
        match self.shape.as_slice() {
            [c] => Some((1, *c)),
            [r, c] => Some((*r, *c)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset where the data region starts.
    pub data_start: u64,
    pub data_len: u64,
}

impl Header {
    pub fn read(src: &dyn RangeSource) -> Result<Header> {
        let path = src.name();
        if src.len() < 8 {
            return Err(AvbError::truncated(
                path,
                format!(
                    "{} bytes, shorter than the 8-byte safetensors length prefix",
                    src.len()
                ),
            ));
        }
        let n = u64::from_le_bytes(src.read_vec(0, 8)?.try_into().unwrap());
        if n > MAX_HEADER_BYTES {
            return Err(AvbError::corrupt(
                path,
                format!(
                    "header length {n} exceeds {MAX_HEADER_BYTES} bytes (not a safetensors file?)"
                ),
            ));
        }
        if 8 + n > src.len() {
            return Err(AvbError::truncated(
                path,
                format!(
                    "header claims {n} bytes but the file has only {} after the prefix",
                    src.len() - 8
                ),
            ));
        }
        let raw = src.read_vec(8, n as usize)?;
        let json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
            AvbError::corrupt(path, format!("safetensors header is not valid JSON ({e})"))
        })?;
        let obj = json
            .as_object()
            .ok_or_else(|| AvbError::corrupt(path, "safetensors header is not a JSON object"))?;
        let data_start = 8 + n;
        let data_len = src.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut covered = 0u64;
        for (name, v) in obj {
            if name == "__metadata__" {
                let m = v
                    .as_object()
                    .ok_or_else(|| AvbError::corrupt(path, "__metadata__ is not an object"))?;
                for (k, v) in m {
                    let s = v.as_str().ok_or_else(|| {
                        AvbError::corrupt(path, format!("__metadata__ value `{k}` is not a string"))
                    })?;
                    metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            let info = parse_tensor(path, name, v)?;
            if info.1 > data_len {
                return Err(AvbError::truncated(
                    path,
                    format!("tensor `{name}` ends at data byte {} but the data region has {data_len} bytes", info.1),
                ));
            }
            covered = covered.max(info.1);
            let (dtype, shape) = info.2;
            tensors.insert(
                name.clone(),
                TensorInfo {
                    dtype,
                    shape,
                    start: data_start + info.0,
                    end: data_start + info.1,
                },
            );
        }
        if covered != data_len {
            return Err(AvbError::corrupt(
                path,
                format!("{} trailing bytes after the last tensor (data region {data_len} bytes, tensors cover {covered})", data_len - covered),
            ));
        }
        Ok(Header {
            tensors,
            metadata,
            data_start,
            data_len,
        })
    }

    pub fn tensor(&self, src: &dyn RangeSource, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            AvbError::corrupt(
                src.name(),
                format!("tensor `{name}` is missing (tensors present: {have:?})"),
            )
        })
    }
}

type Parsed = (u64, u64, (Dtype, Vec<usize>));

fn parse_tensor(path: &std::path::Path, name: &str, v: &serde_json::Value) -> Result<Parsed> {
    let bad = |d: &str| AvbError::corrupt(path, format!("tensor `{name}`: {d}"));
    let dtype_s = v
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("no dtype"))?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| bad("shape entry is not a non-negative integer"))
        })
        .collect::<Result<_>>()?;
    let offs = v
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("data_offsets is not a pair"))?;
    let begin = offs[0].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
    let end = offs[1].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(&format!("unknown dtype `{dtype_s}`")))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad("shape overflows"))?;
    let bytes = (numel as u64)
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| bad("size overflows"))?;
    if end < begin || end - begin != bytes {
        return Err(bad(&format!("data_offsets {begin}..{end} hold {} bytes but shape {shape:?} of {dtype_s} needs {bytes}", end.saturating_sub(begin))));
    }
    Ok((begin, end, (dtype, shape)))
}

/// A tensor to be written: name, dtype (F32 or F16), shape and values.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Serialise tensors into (header bytes incl. the length prefix, data bytes). Tensors are laid out in the order
/// given; the header is padded with spaces to an 8-byte boundary so the data is aligned.
pub fn serialize(tensors: &[TensorOut], metadata: &BTreeMap<String, String>) -> (Vec<u8>, Vec<u8>) {
    let encoded: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            assert_eq!(t.shape.iter().product::<usize>(), t.values.len());
            encode_f32(t.dtype, t.values)
        })
        .collect();
    let raw: Vec<TensorBytes> = tensors
        .iter()
        .zip(&encoded)
        .map(|(t, data)| TensorBytes {
            name: t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data,
        })
        .collect();
    serialize_bytes(&raw, metadata)
}

/// A tensor to be written from its little-endian bytes (any dtype, integers included).
pub struct TensorBytes<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// `serialize` for tensors already in their byte form.
pub fn serialize_bytes(
    tensors: &[TensorBytes],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<u8>) {
    let mut data = Vec::new();
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    for t in tensors {
        assert_eq!(
            t.shape.iter().product::<usize>() * t.dtype.size(),
            t.data.len()
        );
        let begin = data.len();
        data.extend_from_slice(t.data);
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&json);
    (head, data)
}

/// Read rows `row..row + count` of a 1-D or 2-D float tensor as f32, touching only those bytes.
pub fn read_rows(
    src: &dyn RangeSource,
    info: &TensorInfo,
    row: usize,
    count: usize,
) -> Result<Vec<f32>> {
    if !info.dtype.is_float() {
        return Err(AvbError::unsupported(
            src.name(),
            "tensor is not a float tensor; avb reads F32, F16, BF16 and F64",
        ));
    }
    let (rows, cols) = info.rows_cols().ok_or_else(|| {
        AvbError::unsupported(
            src.name(),
            format!("expected a 1-D or 2-D tensor, got shape {:?}", info.shape),
        )
    })?;
    if row + count > rows {
        return Err(AvbError::Invalid(format!(
            "{}: rows {}..{} requested but the tensor has {rows} rows",
            src.name().display(),
            row,
            row + count
        )));
    }
    let row_bytes = (cols * info.dtype.size()) as u64;
    let bytes = src.read_vec(
        info.start + row as u64 * row_bytes,
        (count as u64 * row_bytes) as usize,
    )?;
    let mut out = Vec::new();
    decode_f32(info.dtype, &bytes, &mut out);
    Ok(out)
}
