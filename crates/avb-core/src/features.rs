//! Feature directions to explain: SAELens v5/v6 SAEs (`cfg.json` + `sae_weights.safetensors`, `W_dec
//! [d_sae, d_in]`), GemmaScope-2 `params.safetensors` (`w_dec`), plain direction files ([n, d] safetensors or
//! .npy, optional labels JSON) and avbridge mapped-feature tables. Rows are read lazily by offset.

use crate::artifact::{file_name, Artifact, Body, InputRef, Space};
use crate::error::{AvbError, Result};
use crate::io::{BytesSource, FileSource, RangeSource};
use crate::npy;
use crate::safetensors::{self, Header, TensorInfo};
use std::path::{Path, PathBuf};

pub struct FeatureSource {
    /// `saelens`, `gemmascope`, `directions`, `mapped_features` or `concept_directions`.
    pub kind: String,
    /// The site the directions live in, when the files say (SAELens cfg, mapped tables).
    pub space: Option<Space>,
    pub labels: Option<Vec<Option<String>>>,
    /// For mapped tables: the original feature ids of each row.
    pub ids: Option<Vec<u64>>,
    pub file: PathBuf,
    src: Box<dyn RangeSource>,
    info: TensorInfo,
    artifact: Option<Artifact>,
}

impl FeatureSource {
    /// Open a feature source, detecting its kind. `path` may be an SAELens directory, a `cfg.json`, a
    /// safetensors file, or an .npy file. `labels` overrides the sibling `<stem>.labels.json`.
    pub fn open(path: &Path, labels: Option<&Path>) -> Result<FeatureSource> {
        if path.is_dir() {
            return open_saelens_dir(path);
        }
        if path.file_name().is_some_and(|n| n == "cfg.json") {
            return open_saelens_dir(path.parent().unwrap_or(Path::new(".")));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let mut fs = match ext {
            "npy" => {
                let src = FileSource::open(path)?;
                let info = npy::read_header(&src)?;
                FeatureSource::plain("directions", path, Box::new(src), info)
            }
            "safetensors" => open_safetensors(path)?,
            _ => {
                return Err(AvbError::unsupported(
                    path,
                    "unknown feature file type; pass an SAELens directory (cfg.json + sae_weights.safetensors), a GemmaScope params.safetensors, a [n, d] .safetensors or .npy direction file, or an avbridge mapped-feature table",
                ))
            }
        };
        let sibling = path.with_extension("labels.json");
        let labels_path = labels
            .map(Path::to_path_buf)
            .or_else(|| sibling.exists().then_some(sibling));
        if let Some(lp) = labels_path {
            fs.labels = Some(read_labels(&lp, fs.len())?);
        }
        Ok(fs)
    }

    fn plain(
        kind: &str,
        path: &Path,
        src: Box<dyn RangeSource>,
        info: TensorInfo,
    ) -> FeatureSource {
        FeatureSource {
            kind: kind.into(),
            space: None,
            labels: None,
            ids: None,
            file: path.to_path_buf(),
            src,
            info,
            artifact: None,
        }
    }

    pub fn len(&self) -> usize {
        self.info.rows_cols().map_or(0, |(r, _)| r)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn d(&self) -> usize {
        self.info.rows_cols().map_or(0, |(_, c)| c)
    }

    /// The id reported for row `i` (the SAE latent index unless the table says otherwise).
    pub fn id(&self, i: usize) -> u64 {
        self.ids.as_ref().map_or(i as u64, |ids| ids[i])
    }

    /// Row index of feature id `id`.
    pub fn index_of(&self, id: u64) -> Result<usize> {
        let idx = match &self.ids {
            Some(ids) => ids.iter().position(|x| *x == id),
            None => (id < self.len() as u64).then_some(id as usize),
        };
        idx.ok_or_else(|| {
            AvbError::Invalid(format!(
                "{}: feature {id} does not exist (the source has {} features{})",
                self.file.display(),
                self.len(),
                if self.ids.is_some() {
                    " with explicit ids"
                } else {
                    ", ids 0.."
                }
            ))
        })
    }

    pub fn label(&self, i: usize) -> Option<&str> {
        self.labels
            .as_ref()
            .and_then(|l| l.get(i))
            .and_then(|l| l.as_deref())
    }

    /// One feature row as f32 (reads only its bytes; hash-verified for avbridge tables).
    pub fn row(&self, i: usize) -> Result<Vec<f32>> {
        match &self.artifact {
            Some(a) => {
                let row = a.read_rows("features", i, 1)?;
                self.check_finite(i, row)
            }
            None => {
                let (start, end) = self.row_range(i)?;
                self.decode_row(i, &self.src.read_vec(start, (end - start) as usize)?)
            }
        }
    }

    /// Absolute byte range of row `i` in the file: what a browser fetches by HTTP range. Hash-checked avbridge
    /// tables are read through their chunks instead, so they have none.
    pub fn row_range(&self, i: usize) -> Result<(u64, u64)> {
        if self.artifact.is_some() {
            return Err(AvbError::unsupported(
                &self.file,
                "rows of an avbridge table are read with their chunk hashes, not by byte range; fetch the table whole",
            ));
        }
        if i >= self.len() {
            return Err(AvbError::Invalid(format!(
                "{}: feature row {i} does not exist (the source has {})",
                self.file.display(),
                self.len()
            )));
        }
        let row_bytes = (self.d() * self.info.dtype.size()) as u64;
        let start = self.info.start + i as u64 * row_bytes;
        Ok((start, start + row_bytes))
    }

    /// Row `i` from the bytes of its [`row_range`](Self::row_range), fetched elsewhere.
    pub fn decode_row(&self, i: usize, bytes: &[u8]) -> Result<Vec<f32>> {
        let (start, end) = self.row_range(i)?;
        if bytes.len() as u64 != end - start {
            return Err(AvbError::truncated(
                &self.file,
                format!(
                    "feature row {i} is bytes {start}..{end} ({} bytes) but {} arrived",
                    end - start,
                    bytes.len()
                ),
            ));
        }
        let mut row = Vec::with_capacity(self.d());
        safetensors::decode_f32(self.info.dtype, bytes, &mut row);
        self.check_finite(i, row)
    }

    fn check_finite(&self, i: usize, row: Vec<f32>) -> Result<Vec<f32>> {
        match row.iter().position(|v| !v.is_finite()) {
            Some(c) => Err(AvbError::NonFinite {
                what: format!("{} feature row", self.file.display()),
                row: i,
                col: c,
            }),
            None => Ok(row),
        }
    }

    /// A feature file known by its name, its length and its first bytes (at least
    /// [`header_extent`](crate::features::header_extent) of them):
    /// how the browser opens an SAE's `sae_weights.safetensors` (with its `cfg.json` text), a GemmaScope
    /// `params.safetensors` or a direction file (.safetensors or .npy) before fetching single rows by range.
    pub fn from_prefix(
        name: &str,
        len: u64,
        prefix: Vec<u8>,
        saelens_cfg: Option<&str>,
    ) -> Result<FeatureSource> {
        let path = PathBuf::from(name);
        let src = BytesSource::prefix(name, prefix, len);
        if name.ends_with(".npy") {
            let info = npy::read_header(&src)?;
            return Ok(FeatureSource::plain(
                "directions",
                &path,
                Box::new(src),
                info,
            ));
        }
        let header = Header::read(&src)?;
        if header.metadata.contains_key(crate::artifact::METADATA_KEY) {
            return Err(AvbError::unsupported(
                &path,
                "an avbridge table is read with its chunk hashes; fetch it whole instead of by range",
            ));
        }
        let mut fs = match saelens_cfg {
            Some(text) => {
                let cfg = parse_saelens_cfg(text, Path::new("cfg.json"))?;
                let info = saelens_decoder(&src, &header, &cfg)?;
                let mut fs = FeatureSource::plain("saelens", &path, Box::new(src), info);
                fs.space = Some(cfg.space());
                fs
            }
            None => {
                let (kind, info) = decoder_tensor(&src, &header)?;
                FeatureSource::plain(kind, &path, Box::new(src), info)
            }
        };
        fs.file = path;
        Ok(fs)
    }

    /// Reference recorded by tables derived from this source.
    pub fn input_ref(&self) -> Result<InputRef> {
        Ok(match &self.artifact {
            Some(a) => a.input_ref(),
            None => InputRef {
                file: file_name(&self.file),
                sha256: crate::artifact::file_sha256(&self.file)?,
            },
        })
    }
}

fn open_safetensors(path: &Path) -> Result<FeatureSource> {
    let src = FileSource::open(path)?;
    let header = Header::read(&src)?;
    if header.metadata.contains_key(crate::artifact::METADATA_KEY) {
        let art = Artifact::open(path)?;
        let (space, labels, ids) = match &art.meta.body {
            Body::MappedFeatures(m) => (
                m.target.clone(),
                m.labels.clone(),
                Some(m.feature_ids.clone()),
            ),
            Body::ConceptDirections(m) => (
                m.space.clone(),
                Some(m.labels.iter().cloned().map(Some).collect()),
                None,
            ),
            other => return Err(AvbError::unsupported(
                path,
                format!("an avbridge `{}` artifact is not a feature table; pass a mapped_features or concept_directions table, an SAE or a direction file", other.kind()),
            )),
        };
        let info = art.tensor_info("features")?.clone();
        return Ok(FeatureSource {
            kind: art.meta.body.kind().into(),
            space: Some(space),
            labels,
            ids,
            file: path.to_path_buf(),
            src: Box::new(src),
            info,
            artifact: Some(art),
        });
    }
    let (kind, info) = decoder_tensor(&src, &header)?;
    Ok(FeatureSource::plain(kind, path, Box::new(src), info))
}

/// The tensor holding the directions and the source kind it implies: GemmaScope-2 stores `w_dec`, SAELens
/// `W_dec`, a direction file one 2-D float tensor (or one named `directions`).
fn decoder_tensor(src: &dyn RangeSource, header: &Header) -> Result<(&'static str, TensorInfo)> {
    let (kind, name) = if header.tensors.contains_key("w_dec") {
        ("gemmascope", "w_dec".to_string())
    } else if header.tensors.contains_key("W_dec") {
        ("saelens", "W_dec".to_string())
    } else if header.tensors.contains_key("directions") {
        ("directions", "directions".to_string())
    } else {
        let two_d: Vec<&String> = header
            .tensors
            .iter()
            .filter(|(_, t)| t.shape.len() == 2 && t.dtype.is_float())
            .map(|(n, _)| n)
            .collect();
        match two_d.as_slice() {
            [one] => ("directions", (*one).clone()),
            _ => {
                return Err(AvbError::unsupported(
                    src.name(),
                    format!("cannot tell which tensor holds the directions (2-D float tensors: {two_d:?}); name it `directions`, `W_dec` or `w_dec`"),
                ))
            }
        }
    };
    let info = header.tensor(src, &name)?.clone();
    if info.shape.len() != 2 || !info.dtype.is_float() {
        return Err(AvbError::unsupported(
            src.name(),
            format!(
                "tensor `{name}` must be a 2-D float [n, d] matrix, got {:?}",
                info.shape
            ),
        ));
    }
    Ok((kind, info))
}

/// The fields of an SAELens cfg.json that matter here (v6 nests model and hook under `metadata`; v5 is flat).
struct SaeLensCfg {
    d_in: usize,
    d_sae: usize,
    model: String,
    hook_name: String,
}

impl SaeLensCfg {
    fn space(&self) -> Space {
        Space {
            model: self.model.clone(),
            layer: resid_post_layer(&self.hook_name),
            d: self.d_in,
        }
    }
}

/// `W_dec` of an SAELens SAE, checked against its cfg.json.
fn saelens_decoder(src: &dyn RangeSource, header: &Header, cfg: &SaeLensCfg) -> Result<TensorInfo> {
    let info = header.tensor(src, "W_dec")?.clone();
    if info.shape != [cfg.d_sae, cfg.d_in] {
        return Err(AvbError::dimension(
            src.name().display().to_string(),
            format!(
                "W_dec has shape {:?} but cfg.json says [d_sae, d_in] = [{}, {}]",
                info.shape, cfg.d_sae, cfg.d_in
            ),
            "the weights and cfg.json belong to different SAEs; download them together",
        ));
    }
    Ok(info)
}

fn parse_saelens_cfg(text: &str, path: &Path) -> Result<SaeLensCfg> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| AvbError::corrupt(path, format!("not valid JSON ({e})")))?;
    let field = |k: &str| {
        v.get("metadata")
            .and_then(|m| m.get(k))
            .or_else(|| v.get(k))
    };
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| AvbError::corrupt(path, format!("SAELens cfg has no integer `{k}`")))
    };
    Ok(SaeLensCfg {
        d_in: num("d_in")?,
        d_sae: num("d_sae")?,
        model: field("model_name")
            .and_then(|x| x.as_str())
            .unwrap_or("unknown")
            .to_string(),
        hook_name: field("hook_name")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string(),
    })
}

/// `blocks.K.hook_resid_post` -> K. Other hooks (resid_pre, attn/mlp outputs) have no block-output layer.
fn resid_post_layer(hook: &str) -> Option<u32> {
    let rest = hook.strip_prefix("blocks.")?;
    let (k, site) = rest.split_once('.')?;
    (site == "hook_resid_post")
        .then(|| k.parse().ok())
        .flatten()
}

fn open_saelens_dir(dir: &Path) -> Result<FeatureSource> {
    let cfg_path = dir.join("cfg.json");
    let weights = dir.join("sae_weights.safetensors");
    if !cfg_path.exists() {
        return Err(AvbError::unsupported(dir, "directory without cfg.json (expected an SAELens SAE: cfg.json + sae_weights.safetensors)"));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| AvbError::io(&cfg_path, e))?;
    let cfg = parse_saelens_cfg(&text, &cfg_path)?;
    let src = FileSource::open(&weights)?;
    let header = Header::read(&src)?;
    let info = saelens_decoder(&src, &header, &cfg)?;
    let mut fs = FeatureSource::plain("saelens", &weights, Box::new(src), info);
    fs.space = Some(cfg.space());
    let labels = dir.join("labels.json");
    if labels.exists() {
        fs.labels = Some(read_labels(&labels, fs.len())?);
    }
    Ok(fs)
}

/// Labels as a JSON list (one per row, null allowed) or an object {"<row id>": "label"}.
pub fn read_labels(path: &Path, n: usize) -> Result<Vec<Option<String>>> {
    let text = std::fs::read_to_string(path).map_err(|e| AvbError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| AvbError::corrupt(path, format!("labels file is not valid JSON ({e})")))?;
    let mut out = vec![None; n];
    match v {
        serde_json::Value::Array(items) => {
            if items.len() != n {
                return Err(AvbError::dimension(
                    path.display().to_string(),
                    format!("{} labels for {n} directions", items.len()),
                    "give one label (or null) per direction row, or an object keyed by row index",
                ));
            }
            for (o, item) in out.iter_mut().zip(items) {
                *o = item.as_str().map(str::to_string);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map {
                let i: usize = k.parse().map_err(|_| {
                    AvbError::corrupt(path, format!("label key `{k}` is not a row index"))
                })?;
                if i >= n {
                    return Err(AvbError::dimension(
                        path.display().to_string(),
                        format!("label for row {i} but there are {n} rows"),
                        "remove labels of rows that do not exist",
                    ));
                }
                out[i] = item.as_str().map(str::to_string);
            }
        }
        _ => {
            return Err(AvbError::corrupt(
                path,
                "labels must be a JSON list or object",
            ))
        }
    }
    Ok(out)
}

/// How many bytes from the start of a safetensors or .npy file hold its header, from at least its first 12 bytes;
/// None when `prefix` is too short to tell or is neither format.
pub fn header_extent(prefix: &[u8]) -> Option<u64> {
    if prefix.starts_with(b"\x93NUMPY") {
        return match *prefix.get(6)? {
            1 => Some(10 + u64::from(u16::from_le_bytes([*prefix.get(8)?, *prefix.get(9)?]))),
            _ => Some(12 + u64::from(u32::from_le_bytes(prefix.get(8..12)?.try_into().ok()?))),
        };
    }
    Some(8 + u64::from_le_bytes(prefix.get(..8)?.try_into().ok()?))
}
