//! GGUF (versions 2 and 3): the llama.cpp container. Header = magic `GGUF`, version, tensor count, metadata count;
//! then typed key/value metadata, tensor infos (name, dims innermost-first, type, offset), padding to
//! `general.alignment` (default 32), and the tensor data. Parsing reads the header through a buffered cursor over
//! a RangeSource (the vocabulary alone can be megabytes) and bounds-checks every count and offset, so a
//! truncated or hostile file gives an error, never a panic or a huge allocation.

use crate::quant::{dequantize, GgmlType};
use avb_core::io::RangeSource;
use avb_core::{AvbError, Result};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Caps on counts read from the header (far above any real model) so a corrupt count cannot exhaust memory.
const MAX_ENTRIES: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Integer value of any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions innermost-first, as GGUF stores them (ne0 = row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    pub n_bytes: u64,
}

impl GgufTensor {
    /// Shape in row-major order (outermost first), the order safetensors and PyTorch use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|d| *d as usize).collect()
    }
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    pub alignment: u64,
    pub data_start: u64,
}

/// Sequential reads over a RangeSource through a 1 MiB buffer.
struct Cursor<'a> {
    src: &'a dyn RangeSource,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'a> Cursor<'a> {
    fn new(src: &'a dyn RangeSource) -> Self {
        Cursor {
            src,
            pos: 0,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    fn truncated(&self, what: &str, need: u64) -> AvbError {
        AvbError::truncated(
            self.src.name(),
            format!(
                "GGUF header ends inside {what} (needed {need} bytes at offset {}, file has {})",
                self.pos,
                self.src.len()
            ),
        )
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        if self.pos.checked_add(n).is_none_or(|e| e > self.src.len()) {
            return Err(self.truncated(what, n));
        }
        let buf_end = self.buf_start + self.buf.len() as u64;
        if self.pos < self.buf_start || self.pos + n > buf_end {
            let len = n.max(1 << 20).min(self.src.len() - self.pos);
            self.buf = self.src.read_vec(self.pos, len as usize)?;
            self.buf_start = self.pos;
        }
        let at = (self.pos - self.buf_start) as usize;
        self.pos += n;
        Ok(&self.buf[at..at + n as usize])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64, what)?.try_into().unwrap())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let path = self.src.name().to_path_buf();
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| AvbError::corrupt(&path, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => MetaValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(AvbError::unsupported(
                        self.src.name(),
                        format!("metadata `{key}` nests arrays more than one level"),
                    ));
                }
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the file is corrupt.
                if count > self.src.len() - self.pos.min(self.src.len()) {
                    return Err(
                        self.truncated(&format!("array `{key}` of {count} elements"), count)
                    );
                }
                let mut items = Vec::with_capacity(count.min(1 << 20) as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => {
                return Err(AvbError::corrupt(
                    self.src.name(),
                    format!("metadata `{key}` has unknown value type {t}"),
                ))
            }
        })
    }
}

impl Gguf {
    pub fn read(src: &dyn RangeSource) -> Result<Gguf> {
        let path = src.name().to_path_buf();
        let mut c = Cursor::new(src);
        if &c.array::<4>("the magic")? != MAGIC {
            return Err(AvbError::corrupt(
                &path,
                "missing the GGUF magic (not a GGUF file)",
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(AvbError::unsupported(&path, format!("GGUF version {version}; avb reads versions 2 and 3 (re-convert with a current llama.cpp)")));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES {
            return Err(AvbError::corrupt(
                &path,
                format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(AvbError::corrupt(
                        &path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ))
                }
            },
        };
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(AvbError::corrupt(
                    &path,
                    format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<u64>>>()?;
            if dims.contains(&0) {
                return Err(AvbError::corrupt(
                    &path,
                    format!("tensor `{name}` has a zero dimension ({dims:?})"),
                ));
            }
            let type_id = c.u32(&name)?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                AvbError::unsupported(&path, format!("tensor `{name}` has GGML type {type_id}; avb reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"))
            })?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let numel = dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
            let n_bytes = numel.and_then(|n| if dims[0] % ty.block().0 as u64 == 0 { ty.bytes_for(n) } else { None }).ok_or_else(|| {
                AvbError::corrupt(&path, format!("tensor `{name}` of type {} has dims {dims:?}: rows must be whole blocks of {}", ty.name(), ty.block().0))
            })?;
            if offset % alignment != 0 {
                return Err(AvbError::corrupt(
                    &path,
                    format!("tensor `{name}` offset {offset} is not aligned to {alignment}"),
                ));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(n_bytes).is_some_and(|e| e <= src.len()));
            let Some(start) = start else {
                return Err(AvbError::truncated(
                    &path,
                    format!(
                        "tensor `{name}` needs bytes up to {} but the file has {}",
                        data_start.saturating_add(offset).saturating_add(n_bytes),
                        src.len()
                    ),
                ));
            };
            tensors.push(GgufTensor {
                name,
                dims,
                ty,
                start,
                n_bytes,
            });
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A whole tensor dequantized to f32, row-major with `shape()`.
    pub fn read_f32(&self, src: &dyn RangeSource, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| {
            AvbError::corrupt(src.name(), format!("GGUF tensor `{name}` is missing"))
        })?;
        self.read_rows_f32(src, t, 0, (t.numel() / t.dims[0]) as usize)
    }

    /// Rows `row..row + count` of a tensor (a row is dims[0] elements), dequantized to f32.
    pub fn read_rows_f32(
        &self,
        src: &dyn RangeSource,
        t: &GgufTensor,
        row: usize,
        count: usize,
    ) -> Result<Vec<f32>> {
        let rows = (t.numel() / t.dims[0]) as usize;
        if row.checked_add(count).is_none_or(|e| e > rows) {
            return Err(AvbError::Invalid(format!(
                "{}: rows {row}..{} of `{}` requested but it has {rows}",
                src.name().display(),
                row + count,
                t.name
            )));
        }
        let row_bytes = t.ty.bytes_for(t.dims[0]).unwrap_or(0);
        let bytes = src.read_vec(
            t.start + row as u64 * row_bytes,
            (count as u64 * row_bytes) as usize,
        )?;
        let mut out = Vec::new();
        dequantize(t.ty, &bytes, &mut out);
        Ok(out)
    }
}
