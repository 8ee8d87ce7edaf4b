//! Versioned avbridge artifacts: a safetensors file whose `__metadata__["avbridge"]` holds one JSON document
//! (schema, version, kind, provenance, metrics) and whose tensors hold the payload. The JSON records the sha256
//! of the whole data region and of each 1 MiB chunk of it, so a reader of one row verifies just the chunks it
//! touched, and `verify` checks everything. See docs/formats.md.

use crate::error::{AvbError, Result};
use crate::io::{write_atomic, FileSource, RangeSource};
use crate::matrix::Matrix;
use crate::safetensors::{self, Dtype, Header, TensorInfo, TensorOut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const SCHEMA: &str = "avbridge.artifact";
pub const SCHEMA_VERSION: u32 = 1;
pub const METADATA_KEY: &str = "avbridge";
pub const CHUNK_BYTES: u64 = 1 << 20;
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A residual-stream site: model id, layer K meaning the OUTPUT of decoder block K (HF `hidden_states[K+1]`,
/// SAELens `blocks.K.hook_resid_post`), and width.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Space {
    pub model: String,
    pub layer: Option<u32>,
    pub d: usize,
}

impl Space {
    /// Whether two sites can be the same residual stream: same model (by the last path component, case-blind)
    /// and layer, where both are known.
    pub fn same_site(&self, other: &Space) -> bool {
        let model = |s: &Space| s.model.rsplit('/').next().unwrap_or("").to_lowercase();
        let known = |s: &Space| s.model != "unknown";
        (!known(self) || !known(other) || model(self) == model(other))
            && (self.layer.is_none() || other.layer.is_none() || self.layer == other.layer)
    }
}

/// A washout must live where the map lands: the map's target model and layer, at its width.
pub fn check_washout_for_map(washout: &Space, map_target: &Space) -> Result<()> {
    if washout.d == map_target.d && washout.same_site(map_target) {
        return Ok(());
    }
    Err(AvbError::Invalid(format!(
        "the washout is for {washout} but the map targets {map_target}; compute the washout from the map's target model and layer"
    )))
}

/// A map must land where the verbalizer reads: its model, its extraction layer, its width.
pub fn check_map_for_verbalizer(map_target: &Space, verbalizer: &Space) -> Result<()> {
    if map_target.d == verbalizer.d && map_target.same_site(verbalizer) {
        return Ok(());
    }
    Err(AvbError::Invalid(format!(
        "the map targets {map_target} but the verbalizer reads {verbalizer}; fit the map to the verbalizer's model and extraction layer"
    )))
}

/// "model L16 (d=896)"
impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{} L{l} (d={})", self.model, self.d),
            None => write!(f, "{} (d={})", self.model, self.d),
        }
    }
}

/// A reference to an input file: its name (never a machine path) and sha256 (of the avbridge payload for
/// artifacts, of the whole file otherwise).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InputRef {
    pub file: String,
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CorpusRef {
    pub id: String,
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ActivationSetMeta {
    pub space: Space,
    /// `mean` (over tokens) or `last` (last token).
    pub pooling: String,
    pub corpus: CorpusRef,
    pub row_ids: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Split {
    /// How rows are assigned; see docs/formats.md ("splitmix64-fisher-yates-v1").
    pub algorithm: String,
    pub seed: u64,
    pub holdout_fraction: f64,
    pub n_train: usize,
    pub n_holdout: usize,
    pub holdout_row_ids: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LambdaSelection {
    /// `given` or `cv`.
    pub mode: String,
    pub folds: Option<usize>,
    pub grid: Vec<f64>,
    /// Mean over folds of the variance-weighted held-out R^2, one per grid value.
    pub cv_r2: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FitMetrics {
    pub n: usize,
    /// Mean over rows of cos(predicted row, true row).
    pub mean_cosine: f64,
    /// Same after subtracting the training target mean from both (how much beyond the shared mean direction is predicted).
    pub mean_centered_cosine: f64,
    /// Mean cos(training target mean, true row): what predicting a constant would score.
    pub mean_baseline_cosine: f64,
    /// 1 - SSE / SST pooled over all output columns (sklearn `variance_weighted`).
    pub r2_variance_weighted: f64,
    /// Mean of per-column R^2 (sklearn `uniform_average`).
    pub r2_uniform: f64,
    /// Quantiles (0, 5, 25, 50, 75, 95, 100 %) of the per-row cosine, linear interpolation as numpy.
    pub cosine_quantiles: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RidgeMapMeta {
    pub source: Space,
    pub target: Space,
    /// `ridge` or `procrustes`.
    pub method: String,
    /// `primal`, `dual` or `svd` (procrustes).
    pub solver: String,
    pub lambda: Option<f64>,
    pub lambda_selection: Option<LambdaSelection>,
    pub fit_intercept: bool,
    pub split: Split,
    pub inputs: BTreeMap<String, InputRef>,
    pub heldout: Option<FitMetrics>,
    pub train: FitMetrics,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WashoutMeta {
    pub space: Space,
    pub pooling: String,
    pub n_rows: usize,
    pub input: InputRef,
    /// ||b||: 1 when all rows point the same way, near 0 when they cancel.
    pub norm: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WashoutUse {
    pub input: InputRef,
    pub weight: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MappedFeaturesMeta {
    pub source: Space,
    pub target: Space,
    /// Where the directions came from: `saelens`, `gemmascope`, `directions`, ...
    pub features_kind: String,
    pub features: InputRef,
    pub feature_ids: Vec<u64>,
    pub labels: Option<Vec<Option<String>>>,
    /// None when the rows are the source directions themselves (no map applied).
    pub map: Option<InputRef>,
    /// Whether the map's intercept was added (directions are usually mapped by the linear part alone).
    pub affine: bool,
    pub washout: Option<WashoutUse>,
    /// Rows are L2-normalised.
    pub normalized: bool,
}

/// Labelled concept directions: per group of texts, mean activation of the group minus the mean over every
/// captured text, L2-normalised. Features with ground-truth labels for models that have no SAE.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConceptDirectionsMeta {
    pub space: Space,
    pub pooling: String,
    pub labels: Vec<String>,
    /// The corpus row ids of each group's texts.
    pub groups: Vec<Vec<String>>,
    /// Row ids of the texts that only enter the corpus mean.
    pub background: Vec<String>,
    pub corpus: CorpusRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    ActivationSet(ActivationSetMeta),
    RidgeMap(RidgeMapMeta),
    Washout(WashoutMeta),
    MappedFeatures(MappedFeaturesMeta),
    ConceptDirections(ConceptDirectionsMeta),
}

impl Body {
    pub fn kind(&self) -> &'static str {
        match self {
            Body::ActivationSet(_) => "activation_set",
            Body::RidgeMap(_) => "ridge_map",
            Body::Washout(_) => "washout",
            Body::MappedFeatures(_) => "mapped_features",
            Body::ConceptDirections(_) => "concept_directions",
        }
    }
    /// The one tensor every artifact of this kind must have, and its expected shape.
    fn main_tensor(&self) -> (&'static str, Vec<Option<usize>>) {
        match self {
            Body::ActivationSet(m) => ("activations", vec![Some(m.row_ids.len()), Some(m.space.d)]),
            Body::RidgeMap(m) => ("weight", vec![Some(m.source.d), Some(m.target.d)]),
            Body::Washout(m) => ("washout", vec![Some(m.space.d)]),
            Body::MappedFeatures(m) => (
                "features",
                vec![Some(m.feature_ids.len()), Some(m.target.d)],
            ),
            Body::ConceptDirections(m) => ("features", vec![Some(m.labels.len()), Some(m.space.d)]),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Payload {
    pub sha256: String,
    pub chunk_bytes: u64,
    pub chunk_sha256: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Metadata {
    pub schema: String,
    pub schema_version: u32,
    pub tool_version: String,
    /// The command that made it (arguments with file names only).
    pub created_by: String,
    pub payload: Payload,
    #[serde(flatten)]
    pub body: Body,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a whole file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| AvbError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| AvbError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A tensor for an artifact being written.
pub struct NamedTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Write an artifact atomically (temp file + rename). `dtype` applies to every tensor (F32 or F16).
pub fn write(
    path: &Path,
    body: Body,
    created_by: &str,
    dtype: Dtype,
    tensors: &[NamedTensor],
) -> Result<Metadata> {
    if !matches!(dtype, Dtype::F32 | Dtype::F16) {
        return Err(AvbError::Invalid(format!(
            "artifact payload dtype must be F32 or F16, not {}",
            dtype.name()
        )));
    }
    for t in tensors {
        if let Some(p) = t.values.iter().position(|v| !v.is_finite()) {
            return Err(AvbError::NonFinite {
                what: format!("{} (tensor `{}` being written)", path.display(), t.name),
                row: p / t.shape.last().copied().unwrap_or(1).max(1),
                col: p % t.shape.last().copied().unwrap_or(1).max(1),
            });
        }
    }
    if dtype == Dtype::F16 {
        for t in tensors {
            if let Some(v) = t.values.iter().find(|v| v.abs() > 65504.0) {
                return Err(AvbError::Invalid(format!(
                    "{}: tensor `{}` holds {v}, beyond the f16 range (65504). Fix: write it with --dtype f32.",
                    path.display(),
                    t.name
                )));
            }
        }
    }
    let outs: Vec<TensorOut> = tensors
        .iter()
        .map(|t| TensorOut {
            name: t.name,
            dtype,
            shape: t.shape.clone(),
            values: t.values,
        })
        .collect();
    // Serialise once without metadata to get the data bytes (the layout does not depend on the header).
    let (_, data) = safetensors::serialize(&outs, &BTreeMap::new());
    let meta = Metadata {
        schema: SCHEMA.into(),
        schema_version: SCHEMA_VERSION,
        tool_version: TOOL_VERSION.into(),
        created_by: created_by.into(),
        payload: Payload {
            sha256: sha256_hex(&data),
            chunk_bytes: CHUNK_BYTES,
            chunk_sha256: data.chunks(CHUNK_BYTES as usize).map(sha256_hex).collect(),
        },
        body,
    };
    let mut md = BTreeMap::new();
    md.insert(
        METADATA_KEY.to_string(),
        serde_json::to_string(&meta).expect("metadata serialises"),
    );
    md.insert("format".to_string(), "pt".to_string());
    let (head, data2) = safetensors::serialize(&outs, &md);
    debug_assert_eq!(data, data2);
    write_atomic(path, &[&head, &data])?;
    Ok(meta)
}

/// An opened artifact. Nothing but the header is read until a tensor or row is asked for.
pub struct Artifact {
    pub src: Box<dyn RangeSource>,
    pub header: Header,
    pub meta: Metadata,
}

impl Artifact {
    pub fn open(path: &Path) -> Result<Artifact> {
        Self::from_source(Box::new(FileSource::open(path)?))
    }

    pub fn from_source(src: Box<dyn RangeSource>) -> Result<Artifact> {
        let header = Header::read(src.as_ref())?;
        let path = src.name().to_path_buf();
        let raw = header.metadata.get(METADATA_KEY).ok_or_else(|| {
            AvbError::unsupported(
                &path,
                "a safetensors file without avbridge metadata (not an avbridge artifact); inputs such as SAEs and direction files are read by `avb map --features`",
            )
        })?;
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| {
            AvbError::corrupt(&path, format!("avbridge metadata is not valid JSON ({e})"))
        })?;
        let schema = value.get("schema").and_then(|s| s.as_str()).unwrap_or("");
        if schema != SCHEMA {
            return Err(AvbError::unsupported(
                &path,
                format!("metadata schema `{schema}` (expected `{SCHEMA}`)"),
            ));
        }
        let version = value
            .get("schema_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if version == 0 || version > SCHEMA_VERSION {
            return Err(AvbError::SchemaVersion {
                path,
                schema: SCHEMA.into(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let meta: Metadata = serde_json::from_value(value).map_err(|e| {
            AvbError::corrupt(
                &path,
                format!("avbridge metadata does not match the schema ({e})"),
            )
        })?;
        let expected_chunks = header.data_len.div_ceil(meta.payload.chunk_bytes.max(1)) as usize;
        if meta.payload.chunk_bytes == 0 || meta.payload.chunk_sha256.len() != expected_chunks {
            return Err(AvbError::corrupt(
                &path,
                format!(
                    "payload has {} chunk hashes for {} data bytes in chunks of {} (expected {expected_chunks})",
                    meta.payload.chunk_sha256.len(),
                    header.data_len,
                    meta.payload.chunk_bytes
                ),
            ));
        }
        let art = Artifact { src, header, meta };
        let (name, shape) = art.meta.body.main_tensor();
        let info = art.tensor_info(name)?;
        let ok = info.shape.len() == shape.len()
            && info
                .shape
                .iter()
                .zip(&shape)
                .all(|(a, b)| b.is_none_or(|b| *a == b));
        if !ok {
            return Err(AvbError::corrupt(
                &path,
                format!(
                    "tensor `{name}` has shape {:?} but the metadata implies {:?}",
                    info.shape, shape
                ),
            ));
        }
        Ok(art)
    }

    pub fn path(&self) -> &Path {
        self.src.name()
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.header.tensor(self.src.as_ref(), name)
    }

    /// Read absolute bytes `start..end` of the data region after checking the hashes of every chunk they touch.
    fn read_verified(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let cb = self.meta.payload.chunk_bytes;
        let (rel_start, rel_end) = (start - self.header.data_start, end - self.header.data_start);
        if rel_start == rel_end {
            return Ok(Vec::new());
        }
        let (first, last) = (rel_start / cb, (rel_end - 1) / cb);
        let span_start = first * cb;
        let span_end = ((last + 1) * cb).min(self.header.data_len);
        let bytes = self.src.read_vec(
            self.header.data_start + span_start,
            (span_end - span_start) as usize,
        )?;
        for (i, chunk) in bytes.chunks(cb as usize).enumerate() {
            let k = first as usize + i;
            let actual = sha256_hex(chunk);
            if actual != self.meta.payload.chunk_sha256[k] {
                return Err(AvbError::HashMismatch {
                    path: self.path().to_path_buf(),
                    region: format!(
                        "payload chunk {k} (bytes {}..{})",
                        k as u64 * cb,
                        k as u64 * cb + chunk.len() as u64
                    ),
                    expected: self.meta.payload.chunk_sha256[k].clone(),
                    actual,
                });
            }
        }
        Ok(bytes[(rel_start - span_start) as usize..(rel_end - span_start) as usize].to_vec())
    }

    /// A whole tensor as f32, hash-verified.
    pub fn read_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name)?.clone();
        let bytes = self.read_verified(info.start, info.end)?;
        let mut out = Vec::new();
        safetensors::decode_f32(info.dtype, &bytes, &mut out);
        Ok((info.shape, out))
    }

    /// A 2-D tensor as a Matrix (a 1-D tensor becomes one row).
    pub fn read_matrix(&self, name: &str) -> Result<Matrix> {
        let (shape, data) = self.read_tensor(name)?;
        let (rows, cols) = match shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            _ => {
                return Err(AvbError::corrupt(
                    self.path(),
                    format!("tensor `{name}` has shape {shape:?}, expected 1-D or 2-D"),
                ))
            }
        };
        Ok(Matrix::new(rows, cols, data))
    }

    /// Rows `row..row + count` of a 2-D tensor, reading and verifying only the chunks that hold them.
    pub fn read_rows(&self, name: &str, row: usize, count: usize) -> Result<Vec<f32>> {
        let info = self.tensor_info(name)?.clone();
        let (rows, cols) = info.rows_cols().unwrap_or((0, 0));
        if row.checked_add(count).is_none_or(|e| e > rows) {
            return Err(AvbError::Invalid(format!(
                "{}: rows {row}..{} of `{name}` requested but it has {rows} rows",
                self.path().display(),
                row.saturating_add(count)
            )));
        }
        let row_bytes = (cols * info.dtype.size()) as u64;
        let start = info.start + row as u64 * row_bytes;
        let bytes = self.read_verified(start, start + count as u64 * row_bytes)?;
        let mut out = Vec::new();
        safetensors::decode_f32(info.dtype, &bytes, &mut out);
        Ok(out)
    }

    /// Check the sha256 of the whole payload and of every chunk.
    pub fn verify(&self) -> Result<()> {
        let cb = self.meta.payload.chunk_bytes;
        let mut full = Sha256::new();
        let mut offset = 0u64;
        let mut k = 0usize;
        while offset < self.header.data_len {
            let len = cb.min(self.header.data_len - offset);
            let chunk = self
                .src
                .read_vec(self.header.data_start + offset, len as usize)?;
            full.update(&chunk);
            let actual = sha256_hex(&chunk);
            if actual != self.meta.payload.chunk_sha256[k] {
                return Err(AvbError::HashMismatch {
                    path: self.path().to_path_buf(),
                    region: format!("payload chunk {k}"),
                    expected: self.meta.payload.chunk_sha256[k].clone(),
                    actual,
                });
            }
            offset += len;
            k += 1;
        }
        let actual = hex(&full.finalize());
        if actual != self.meta.payload.sha256 {
            return Err(AvbError::HashMismatch {
                path: self.path().to_path_buf(),
                region: "whole payload".into(),
                expected: self.meta.payload.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// The reference later artifacts record for this one.
    pub fn input_ref(&self) -> InputRef {
        InputRef {
            file: file_name(self.path()),
            sha256: self.meta.payload.sha256.clone(),
        }
    }
}
