//! Web bundles: a decoder repacked for the browser (and readable natively, so the CLI can run the very bytes a
//! page runs). A bundle is a directory of plain files a static host can serve:
//!
//! - `manifest.json`: format name and schema version, the model's runtime configuration, tokenizer settings, the
//!   size and sha256 of every other file, and where each logical tensor lives;
//! - `tokenizer.json` (Hugging Face tokenizers format) and, when the model has one, `chat_template.jinja`;
//! - optionally `nla_meta.yaml`: the verbalizer sidecar (a trained AV's, or a zero-shot profile) the bundle is
//!   meant to run with;
//! - `weights-NNNNN.safetensors` shards, none larger than the packer's shard limit.
//!
//! Weights are stored the way the runtime multiplies by them: a linear layer's [out, in] matrix is stored
//! transposed as [in, out] and quantized symmetrically in blocks of 32 along `out` (8- or 4-bit integers and one
//! f32 scale per block, scale = max|x| / qmax, q = round(x / scale)). That is the rule and the block direction of
//! burn's Q8S/Q4S per-block quantization, so loading a bundle reproduces the runtime's own `--precision q8|q4`
//! weights. Embedding tables stay [vocab, d], quantized to 8 bits along d, split in vocab row ranges so that no part
//! needs a GPU buffer larger than WebGPU's default binding limit once expanded to f32. Norm weights and biases
//! are f32.

use avb_core::io::{FileSource, RangeSource};
use avb_core::matrix::transpose;
use avb_core::safetensors::{self, Dtype, Header};
use avb_core::{AvbError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "avbridge-web-bundle";
pub const SCHEMA_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
pub const SIDECAR: &str = "nla_meta.yaml";
/// Elements per quantization block.
pub const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bits {
    Q8,
    Q4,
}

impl Bits {
    /// Largest magnitude of a quantized value: the symmetric ranges [-127, 127] and [-7, 7].
    pub fn qmax(self) -> f32 {
        match self {
            Bits::Q8 => 127.0,
            Bits::Q4 => 7.0,
        }
    }

    /// Bytes holding `n` quantized values (two 4-bit values per byte).
    pub fn value_bytes(self, n: usize) -> usize {
        match self {
            Bits::Q8 => n,
            Bits::Q4 => n.div_ceil(2),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bits::Q8 => "q8",
            Bits::Q4 => "q4",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// f32 values in the logical shape.
    F32,
    /// A logical [out, in] weight stored as [in, out], quantized in blocks along `out`.
    QuantizedTransposed,
    /// A logical [rows, cols] table stored as is, quantized in blocks along `cols`.
    QuantizedRows,
}

/// A row range of a tensor (rows of the stored layout) and the shard that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub file: String,
    pub rows: [usize; 2],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The logical shape (Hugging Face convention: [out, in] for linear weights).
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    /// Width of the quantized values (absent for f32): the bundle's precision, except embedding tables,
    /// which are always 8-bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<Bits>,
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// What the tokenizer needs beyond tokenizer.json (GGUF vocabularies carry these as metadata).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSettings {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// tokenizer.json's post-processor adds the special tokens itself.
    pub post_processor: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTemplateSettings {
    pub file: String,
    pub bos_token: String,
    pub eos_token: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceModel {
    /// Registry name or file name of what was packed.
    pub name: String,
    /// sha256 of the packed model file (a GGUF file, or a checkpoint's config.json + shards in name order).
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub schema_version: u32,
    pub tool_version: String,
    pub source: SourceModel,
    pub precision: Bits,
    pub block: usize,
    /// The runtime's model configuration (family, shapes, RoPE, windows), as avb-runtime writes it.
    pub config: serde_json::Value,
    pub tokenizer: TokenizerSettings,
    pub chat_template: Option<ChatTemplateSettings>,
    /// The verbalizer sidecar file, when the bundle carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
    /// Every file of the bundle except the manifest.
    pub files: BTreeMap<String, FileEntry>,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Manifest {
    /// Parse and check a manifest; `name` is used in error messages.
    pub fn parse(bytes: &[u8], name: &Path) -> Result<Manifest> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| AvbError::corrupt(name, format!("not valid JSON ({e})")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(AvbError::corrupt(
                name,
                format!("not an avbridge web bundle manifest (`format` is not \"{FORMAT}\")"),
            ));
        }
        let version = v.get("schema_version").and_then(|s| s.as_u64());
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(AvbError::unsupported(
                name,
                format!(
                    "bundle schema_version {} (this avb reads {SCHEMA_VERSION}); repack the model with this version's `avb pack-web`",
                    version.map_or("missing".to_string(), |v| v.to_string())
                ),
            ));
        }
        let m: Manifest = serde_json::from_value(v)
            .map_err(|e| AvbError::corrupt(name, format!("malformed manifest ({e})")))?;
        if m.block != BLOCK {
            return Err(AvbError::unsupported(
                name,
                format!("quantization block {} (this avb uses {BLOCK})", m.block),
            ));
        }
        for (tensor, entry) in &m.tensors {
            if (entry.encoding == Encoding::F32) != entry.bits.is_none() {
                return Err(AvbError::corrupt(
                    name,
                    format!(
                        "tensor `{tensor}`: `bits` must be given exactly for quantized encodings"
                    ),
                ));
            }
            let (rows, _) = stored_shape(entry);
            let mut next = 0;
            for part in &entry.parts {
                if part.rows[0] != next || part.rows[1] <= part.rows[0] {
                    return Err(AvbError::corrupt(
                        name,
                        format!("tensor `{tensor}`: its parts do not tile its rows in order"),
                    ));
                }
                if !m.files.contains_key(&part.file) {
                    return Err(AvbError::corrupt(
                        name,
                        format!(
                            "tensor `{tensor}` names file `{}` that the manifest does not list",
                            part.file
                        ),
                    ));
                }
                next = part.rows[1];
            }
            if next != rows {
                return Err(AvbError::corrupt(
                    name,
                    format!("tensor `{tensor}`: parts cover {next} of {rows} rows"),
                ));
            }
        }
        Ok(m)
    }
}

/// Stored [rows, cols] of a tensor (a 1-D tensor is one row).
fn stored_shape(entry: &TensorEntry) -> (usize, usize) {
    match (entry.encoding, entry.shape.as_slice()) {
        (Encoding::QuantizedTransposed, [out, inp]) => (*inp, *out),
        (_, [rows, cols]) => (*rows, *cols),
        (_, [n]) => (1, *n),
        _ => (0, 0),
    }
}

/// Name of part `i`'s values (and, with `/scales`, its block scales) inside a shard.
pub fn part_name(tensor: &str, i: usize) -> String {
    format!("{tensor}/{i}")
}

pub fn scales_name(tensor: &str, i: usize) -> String {
    format!("{tensor}/{i}/scales")
}

/// Quantize row-major [rows, cols] in blocks of `BLOCK` along each row; cols must be a multiple of `BLOCK`.
/// Returns the packed values (two's-complement bytes for 8-bit; for 4-bit, q + 8 in the low nibble for even
/// positions and the high nibble for odd ones) and one scale per block.
pub fn quantize(values: &[f32], bits: Bits) -> (Vec<u8>, Vec<f32>) {
    let qmax = bits.qmax();
    let mut packed = vec![0u8; bits.value_bytes(values.len())];
    let mut scales = Vec::with_capacity(values.len() / BLOCK);
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let max_abs = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        // burn computes 2 * max / (qmax - (-qmax)); the same f32 operations give the same scale.
        let scale = 2.0 * max_abs / (2.0 * qmax);
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        scales.push(scale);
        for (j, x) in block.iter().enumerate() {
            let q = (x * inv).round().clamp(-qmax, qmax) as i8;
            let at = b * BLOCK + j;
            match bits {
                Bits::Q8 => packed[at] = q as u8,
                Bits::Q4 => packed[at / 2] |= ((q + 8) as u8) << (4 * (at % 2)),
            }
        }
    }
    (packed, scales)
}

/// The inverse of `quantize` for `n` values.
pub fn dequantize(packed: &[u8], scales: &[f32], bits: Bits, n: usize) -> Vec<f32> {
    (0..n)
        .map(|at| {
            let q = match bits {
                Bits::Q8 => packed[at] as i8 as f32,
                Bits::Q4 => (((packed[at / 2] >> (4 * (at % 2))) & 0xF) as i32 - 8) as f32,
            };
            q * scales[at / BLOCK]
        })
        .collect()
}

/// An opened bundle: its manifest and its files, each verified against the manifest's size and sha256.
pub struct Bundle {
    pub manifest: Manifest,
    name: PathBuf,
    files: BTreeMap<String, Box<dyn RangeSource>>,
    headers: BTreeMap<String, Header>,
}

/// Whether `dir` holds a web bundle (a manifest.json).
pub fn is_bundle_dir(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// The manifest of a bundle directory, checked but without reading the rest of the bundle.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let manifest_path = dir.join(MANIFEST);
    if !manifest_path.exists() {
        return Err(AvbError::Invalid(format!(
            "{}: no {MANIFEST}. Fix: give a directory written by `avb pack-web`.",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&manifest_path).map_err(|e| AvbError::io(&manifest_path, e))?;
    Manifest::parse(&bytes, &manifest_path)
}

impl Bundle {
    /// A bundle directory on disk.
    pub fn open_dir(dir: &Path) -> Result<Bundle> {
        let manifest_path = dir.join(MANIFEST);
        let manifest = read_manifest(dir)?;
        let mut files: BTreeMap<String, Box<dyn RangeSource>> = BTreeMap::new();
        for file in manifest.files.keys() {
            let path = dir.join(plain_file_name(file, &manifest_path)?);
            if !path.exists() {
                return Err(AvbError::Invalid(format!(
                    "{}: {file} is missing. Fix: copy the whole bundle directory, or repack it.",
                    dir.display()
                )));
            }
            files.insert(file.clone(), Box::new(FileSource::open(&path)?));
        }
        Bundle::from_sources(manifest, dir.to_path_buf(), files)
    }

    /// A bundle whose files were fetched elsewhere (the browser): `files` maps manifest file names to their bytes.
    pub fn from_sources(
        manifest: Manifest,
        name: PathBuf,
        files: BTreeMap<String, Box<dyn RangeSource>>,
    ) -> Result<Bundle> {
        let mut headers = BTreeMap::new();
        for (file, entry) in &manifest.files {
            let src = files.get(file).ok_or_else(|| {
                AvbError::Invalid(format!("{}: {file} was not supplied", name.display()))
            })?;
            verify(src.as_ref(), file, entry)?;
            if file.ends_with(".safetensors") {
                headers.insert(file.clone(), Header::read(src.as_ref())?);
            }
        }
        Ok(Bundle {
            manifest,
            name,
            files,
            headers,
        })
    }

    pub fn name(&self) -> &Path {
        &self.name
    }

    /// A text file of the bundle (tokenizer.json, the chat template).
    pub fn text(&self, file: &str) -> Result<String> {
        let src = self.files.get(file).ok_or_else(|| {
            AvbError::corrupt(&self.name, format!("the manifest lists no file `{file}`"))
        })?;
        let bytes = src.read_vec(0, src.len() as usize)?;
        String::from_utf8(bytes).map_err(|_| AvbError::corrupt(src.name(), "not UTF-8 text"))
    }

    pub fn has(&self, tensor: &str) -> bool {
        self.manifest.tensors.contains_key(tensor)
    }

    fn entry(&self, tensor: &str) -> Result<&TensorEntry> {
        self.manifest.tensors.get(tensor).ok_or_else(|| {
            AvbError::corrupt(
                &self.name,
                format!("tensor `{tensor}` is missing from the bundle (packed from another architecture?)"),
            )
        })
    }

    /// Tensor `tensor` in its logical shape (checked against `shape`), as f32.
    pub fn read(&self, tensor: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(tensor)?;
        let stored = self.read_stored(tensor, entry, shape)?;
        Ok(match entry.encoding {
            Encoding::QuantizedTransposed => {
                let (rows, cols) = stored_shape(entry);
                transpose(&stored, rows, cols)
            }
            _ => stored,
        })
    }

    /// A logical [out, in] weight as [in, out] f32: for a transposed tensor, the stored layout, with no transpose.
    pub fn read_transposed(&self, tensor: &str, shape: [usize; 2]) -> Result<Vec<f32>> {
        let entry = self.entry(tensor)?;
        let stored = self.read_stored(tensor, entry, &shape)?;
        Ok(match entry.encoding {
            Encoding::QuantizedTransposed => stored,
            _ => transpose(&stored, shape[0], shape[1]),
        })
    }

    /// The stored layout as f32, all parts concatenated.
    fn read_stored(&self, tensor: &str, entry: &TensorEntry, shape: &[usize]) -> Result<Vec<f32>> {
        if entry.shape != shape {
            return Err(AvbError::dimension(
                format!("{} tensor `{tensor}`", self.name.display()),
                format!(
                    "shape {:?} but the configuration implies {shape:?}",
                    entry.shape
                ),
                "repack the bundle from the model it was meant for",
            ));
        }
        let (_, cols) = stored_shape(entry);
        let mut out = Vec::with_capacity(entry.shape.iter().product());
        for (i, part) in entry.parts.iter().enumerate() {
            out.extend(self.read_part(tensor, entry, part, i, shape, cols)?);
        }
        Ok(out)
    }

    fn read_part(
        &self,
        tensor: &str,
        entry: &TensorEntry,
        part: &Part,
        i: usize,
        logical: &[usize],
        cols: usize,
    ) -> Result<Vec<f32>> {
        let rows = part.rows[1] - part.rows[0];
        let src = self.files[&part.file].as_ref();
        let header = self.headers.get(&part.file).ok_or_else(|| {
            AvbError::corrupt(
                &self.name,
                format!("`{}` is not a safetensors shard", part.file),
            )
        })?;
        let raw = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let info = header.tensor(src, name)?;
            if info.dtype != dtype || info.shape != shape {
                return Err(AvbError::corrupt(
                    src.name(),
                    format!(
                        "`{name}` is {} {:?}; the manifest implies {} {shape:?}",
                        info.dtype.name(),
                        info.shape,
                        dtype.name()
                    ),
                ));
            }
            src.read_vec(info.start, (info.end - info.start) as usize)
        };
        let values = part_name(tensor, i);
        let n = rows * cols;
        let Some(bits) = entry.bits.filter(|_| entry.encoding != Encoding::F32) else {
            let mut out = Vec::new();
            let shape = if logical.len() == 1 {
                vec![n]
            } else {
                vec![rows, cols]
            };
            safetensors::decode_f32(Dtype::F32, &raw(&values, Dtype::F32, &shape)?, &mut out);
            return Ok(out);
        };
        if cols % BLOCK != 0 {
            return Err(AvbError::corrupt(
                &self.name,
                format!("tensor `{tensor}`: {cols} columns is not a whole number of blocks"),
            ));
        }
        let (dtype, packed_cols) = match bits {
            Bits::Q8 => (Dtype::I8, cols),
            Bits::Q4 => (Dtype::U8, cols / 2),
        };
        let packed = raw(&values, dtype, &[rows, packed_cols])?;
        let mut scales = Vec::new();
        safetensors::decode_f32(
            Dtype::F32,
            &raw(&scales_name(tensor, i), Dtype::F32, &[rows, cols / BLOCK])?,
            &mut scales,
        );
        Ok(dequantize(&packed, &scales, bits, n))
    }
}

/// A manifest's file names must be plain names inside the bundle directory.
pub fn plain_file_name<'a>(file: &'a str, manifest: &Path) -> Result<&'a str> {
    if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
        return Err(AvbError::corrupt(
            manifest,
            format!("file name `{file}` is not a plain file name"),
        ));
    }
    Ok(file)
}

/// Check a file's size and sha256 against its manifest entry.
pub fn verify(src: &dyn RangeSource, file: &str, entry: &FileEntry) -> Result<()> {
    if src.len() != entry.bytes {
        return Err(AvbError::truncated(
            src.name(),
            format!(
                "{file} has {} bytes but the manifest says {}; download it again or repack the bundle",
                src.len(),
                entry.bytes
            ),
        ));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 22];
    let mut at = 0u64;
    while at < src.len() {
        let n = (src.len() - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if sha != entry.sha256 {
        return Err(AvbError::corrupt(
            src.name(),
            format!(
                "sha256 mismatch for {file} (manifest {}, file {sha}); download it again or repack the bundle",
                entry.sha256
            ),
        ));
    }
    Ok(())
}
