//! `avb pack-web`: repack a decoder (GGUF file or Hugging Face checkpoint directory) as a web bundle, the format
//! avb_model::bundle reads. The bundle is written into a staging directory next to the output and renamed into
//! place at the end, so an interrupted pack never leaves something that looks like a bundle.

use crate::config::ModelConfig;
use crate::loader::tokenizer_and_template;
use crate::weights::{hf_name, model_tensors, TensorId, WeightSource, BUNDLE_PREFIX};
use avb_core::artifact::{file_sha256, sha256_hex};
use avb_core::io::write_atomic;
use avb_core::safetensors::{self, Dtype, TensorBytes};
use avb_core::{AvbError, Result};
use avb_model::bundle::{
    self, part_name, scales_name, Bits, Encoding, FileEntry, Manifest, Part, SourceModel,
    TensorEntry, BLOCK,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct PackOptions {
    pub bits: Bits,
    /// Largest weight shard, in bytes (one HTTP download and one Cache Storage entry each).
    pub shard_bytes: u64,
    /// Largest part of a tensor once expanded to f32 on the device: WebGPU's default storage-binding limit.
    pub part_f32_bytes: u64,
    /// The verbalizer sidecar (nla_meta.yaml text) to ship with the model, already checked by the caller.
    pub sidecar: Option<String>,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            bits: Bits::Q8,
            shard_bytes: 64 << 20,
            part_f32_bytes: 128 << 20,
            sidecar: None,
        }
    }
}

/// A tensor entry of a shard being assembled.
struct Pending {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Fills shards up to the size limit and writes each one atomically into the staging directory.
struct ShardWriter {
    dir: PathBuf,
    limit: u64,
    pending: Vec<Pending>,
    pending_bytes: u64,
    files: BTreeMap<String, FileEntry>,
}

impl ShardWriter {
    fn current_file(&self) -> String {
        format!("weights-{:05}.safetensors", self.files.len())
    }

    /// Add entries that must share a shard (a part's values and scales); returns that shard's file name.
    fn add(&mut self, entries: Vec<Pending>) -> Result<String> {
        let bytes: u64 = entries.iter().map(|p| p.bytes.len() as u64).sum();
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.limit {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.pending.extend(entries);
        Ok(self.current_file())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let file = self.current_file();
        let outs: Vec<TensorBytes> = self
            .pending
            .iter()
            .map(|p| TensorBytes {
                name: &p.name,
                dtype: p.dtype,
                shape: &p.shape,
                data: &p.bytes,
            })
            .collect();
        let (header, body) = safetensors::serialize_bytes(&outs, &BTreeMap::new());
        write_file(&self.dir, &file, &[&header, &body], &mut self.files)?;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Write one bundle file and record its size and sha256.
fn write_file(
    dir: &Path,
    file: &str,
    parts: &[&[u8]],
    files: &mut BTreeMap<String, FileEntry>,
) -> Result<()> {
    write_atomic(&dir.join(file), parts)?;
    let mut hasher = Sha256::new();
    parts.iter().for_each(|p| hasher.update(p));
    files.insert(
        file.to_string(),
        FileEntry {
            bytes: parts.iter().map(|p| p.len() as u64).sum(),
            sha256: hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        },
    );
    Ok(())
}

/// sha256 of what was packed: the file itself, or for a checkpoint directory the sha256 of the lines
/// `<file> <sha256>` of config.json and every `*.safetensors`, in name order.
pub fn source_sha256(path: &Path) -> Result<String> {
    if path.is_file() {
        return file_sha256(path);
    }
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map_err(|e| AvbError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n == "config.json" || n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut lines = String::new();
    for n in names {
        lines += &format!("{n} {}\n", file_sha256(&path.join(&n))?);
    }
    Ok(sha256_hex(lines.as_bytes()))
}

/// Rows of one part: the f32 expansion must fit a device binding and the packed part a shard.
fn rows_per_part(cols: usize, stored_row_bytes: usize, opts: &PackOptions) -> usize {
    let by_device = opts.part_f32_bytes / (cols as u64 * 4);
    let by_shard = opts.shard_bytes / stored_row_bytes.max(1) as u64;
    by_device.min(by_shard).max(1) as usize
}

/// Split stored [rows, cols] f32 values into parts and hand them to the shard writer.
fn write_parts(
    shards: &mut ShardWriter,
    tensor: &str,
    values: &[f32],
    [rows, cols]: [usize; 2],
    quantized: Option<Bits>,
    one_d: bool,
    opts: &PackOptions,
) -> Result<Vec<Part>> {
    let row_bytes = match quantized {
        Some(b) => b.value_bytes(cols) + cols / BLOCK * 4,
        None => cols * 4,
    };
    let step = rows_per_part(cols, row_bytes, opts);
    let mut parts = Vec::new();
    for (i, r0) in (0..rows).step_by(step).enumerate() {
        let r1 = (r0 + step).min(rows);
        let chunk = &values[r0 * cols..r1 * cols];
        let entries = match quantized {
            Some(bits) => {
                let (packed, scales) = bundle::quantize(chunk, bits);
                let (dtype, packed_cols) = match bits {
                    Bits::Q8 => (Dtype::I8, cols),
                    Bits::Q4 => (Dtype::U8, cols / 2),
                };
                vec![
                    Pending {
                        name: part_name(tensor, i),
                        dtype,
                        shape: vec![r1 - r0, packed_cols],
                        bytes: packed,
                    },
                    Pending {
                        name: scales_name(tensor, i),
                        dtype: Dtype::F32,
                        shape: vec![r1 - r0, cols / BLOCK],
                        bytes: safetensors::encode_f32(Dtype::F32, &scales),
                    },
                ]
            }
            None => vec![Pending {
                name: part_name(tensor, i),
                dtype: Dtype::F32,
                shape: if one_d {
                    vec![cols]
                } else {
                    vec![r1 - r0, cols]
                },
                bytes: safetensors::encode_f32(Dtype::F32, chunk),
            }],
        };
        let file = shards.add(entries)?;
        parts.push(Part {
            file,
            rows: [r0, r1],
        });
    }
    Ok(parts)
}

/// One tensor of the model into the bundle, in the encoding its role calls for.
fn pack_tensor(
    src: &WeightSource,
    c: &ModelConfig,
    id: TensorId,
    shape: &[usize],
    shards: &mut ShardWriter,
    opts: &PackOptions,
) -> Result<(String, TensorEntry)> {
    let name = hf_name(c.family, BUNDLE_PREFIX, id);
    let (encoding, bits, parts) = match *shape {
        [n] => {
            let values = src.read(c, id, shape)?;
            let parts = write_parts(shards, &name, &values, [1, n], None, true, opts)?;
            (Encoding::F32, None, parts)
        }
        [rows, cols] if id == TensorId::Embed => {
            // Embedding tables are 8-bit at every precision, as the runtime's compact path keeps them.
            let values = src.read(c, id, shape)?;
            let bits = (cols % BLOCK == 0).then_some(Bits::Q8);
            let parts = write_parts(shards, &name, &values, [rows, cols], bits, false, opts)?;
            let encoding = if bits.is_some() {
                Encoding::QuantizedRows
            } else {
                Encoding::F32
            };
            (encoding, bits, parts)
        }
        // The runtime quantizes a linear weight in blocks along `out` only when `out` is a multiple of the block.
        [out, inp] if out % BLOCK == 0 => {
            let values = src.read_transposed(c, id, [out, inp])?;
            let parts = write_parts(
                shards,
                &name,
                &values,
                [inp, out],
                Some(opts.bits),
                false,
                opts,
            )?;
            (Encoding::QuantizedTransposed, Some(opts.bits), parts)
        }
        [out, inp] => {
            let values = src.read(c, id, shape)?;
            let parts = write_parts(shards, &name, &values, [out, inp], None, false, opts)?;
            (Encoding::F32, None, parts)
        }
        _ => {
            return Err(AvbError::Invalid(format!(
                "tensor `{name}` has shape {shape:?}; bundles hold 1-D and 2-D tensors"
            )))
        }
    };
    Ok((
        name,
        TensorEntry {
            shape: shape.to_vec(),
            encoding,
            bits,
            parts,
        },
    ))
}

/// Pack the model at `path` (named `name` in the manifest) into the new directory `out`. `progress` is called
/// with (tensors done, tensors in all).
pub fn pack_web(
    path: &Path,
    name: &str,
    out: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    if out.exists() {
        return Err(AvbError::Invalid(format!(
            "{}: already exists. Fix: remove it or choose another output directory.",
            out.display()
        )));
    }
    let (src, config) = WeightSource::open(path)?;
    if src.bundle().is_some() {
        return Err(AvbError::Invalid(format!(
            "{}: is already a web bundle. Fix: pack the original GGUF file or checkpoint directory.",
            path.display()
        )));
    }
    let (tokenizer, chat) = tokenizer_and_template(&src, path)?;
    avb_core::io::build_dir_atomic(out, |staging| {
        write_bundle(
            &src,
            &config,
            path,
            name,
            &tokenizer,
            chat.as_ref(),
            staging,
            opts,
            progress,
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn write_bundle(
    src: &WeightSource,
    config: &ModelConfig,
    path: &Path,
    name: &str,
    tokenizer: &avb_model::tokenizer::Tokenizer,
    chat: Option<&avb_model::chat::ChatTemplate>,
    dir: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    let separate_head = !config.tie_embeddings || src.has(config, TensorId::Head);
    let tensors = model_tensors(config, separate_head);
    let mut shards = ShardWriter {
        dir: dir.to_path_buf(),
        limit: opts.shard_bytes,
        pending: Vec::new(),
        pending_bytes: 0,
        files: BTreeMap::new(),
    };
    let mut entries = BTreeMap::new();
    for (done, (id, shape)) in tensors.iter().enumerate() {
        let (tensor, entry) = pack_tensor(src, config, *id, shape, &mut shards, opts)?;
        entries.insert(tensor, entry);
        progress(done + 1, tensors.len());
    }
    shards.flush()?;
    let mut files = shards.files;
    let (tokenizer_json, tokenizer_settings) = tokenizer.bundle_parts()?;
    write_file(
        dir,
        bundle::TOKENIZER,
        &[tokenizer_json.as_bytes()],
        &mut files,
    )?;
    let chat_template = match chat {
        Some(t) => {
            let (source, settings) = t.bundle_settings(bundle::CHAT_TEMPLATE);
            write_file(dir, bundle::CHAT_TEMPLATE, &[source.as_bytes()], &mut files)?;
            Some(settings)
        }
        None => None,
    };
    if let Some(text) = &opts.sidecar {
        write_file(dir, bundle::SIDECAR, &[text.as_bytes()], &mut files)?;
    }
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        schema_version: bundle::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        source: SourceModel {
            name: name.to_string(),
            sha256: source_sha256(path)?,
        },
        precision: opts.bits,
        block: BLOCK,
        config: serde_json::to_value(config)
            .map_err(|e| AvbError::Invalid(format!("cannot serialize the model config: {e}")))?,
        tokenizer: tokenizer_settings,
        chat_template,
        sidecar: opts.sidecar.as_ref().map(|_| bundle::SIDECAR.to_string()),
        files,
        tensors: entries,
    };
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| AvbError::Invalid(format!("cannot serialize the manifest: {e}")))?;
    write_atomic(&dir.join(bundle::MANIFEST), &[text.as_bytes()])?;
    Ok(manifest)
}
