//! Hugging Face checkpoints as the released AVs ship them: a directory with `config.json`, `tokenizer.json` and
//! either one `model.safetensors` or shards listed by `model.safetensors.index.json` (`weight_map`: tensor name ->
//! shard file). Tensors are read lazily, shard by shard, and converted from F32/F16/BF16 to f32.

use avb_core::io::{FileSource, RangeSource};
use avb_core::safetensors::{self, Header, TensorInfo};
use avb_core::{AvbError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Shard {
    src: FileSource,
    header: Header,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    /// The parsed `config.json`.
    pub config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| AvbError::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| AvbError::corrupt(&config_path, format!("not valid JSON ({e})")))?;
        let index_path = dir.join("model.safetensors.index.json");
        let weight_map: Option<serde_json::Map<String, serde_json::Value>> = if index_path.exists()
        {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| AvbError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| AvbError::corrupt(&index_path, format!("not valid JSON ({e})")))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).cloned();
            Some(map.ok_or_else(|| AvbError::corrupt(&index_path, "no `weight_map` object"))?)
        } else {
            None
        };
        let files: Vec<String> = match &weight_map {
            Some(map) => {
                let mut files: Vec<String> = map
                    .values()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                files.sort();
                files.dedup();
                files
            }
            None => vec!["model.safetensors".to_string()],
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(AvbError::corrupt(
                    &index_path,
                    format!("shard name `{f}` is not a plain file name"),
                ));
            }
            let path = dir.join(f);
            if !path.exists() {
                return Err(AvbError::Invalid(format!(
                    "{}: shard {f} is missing. Fix: download every file the index lists.",
                    dir.display()
                )));
            }
            let src = FileSource::open(&path)?;
            let header = Header::read(&src)?;
            for name in header.tensors.keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(AvbError::corrupt(
                        &path,
                        format!("tensor `{name}` also appears in {}", files[prev]),
                    ));
                }
            }
            shards.push(Shard { src, header });
        }
        // Every tensor the index promises must be in the shard it names.
        if let Some(map) = &weight_map {
            for (name, file) in map {
                let expected = files.iter().position(|f| Some(f.as_str()) == file.as_str());
                if index.get(name).copied() != expected {
                    return Err(AvbError::corrupt(
                        &index_path,
                        format!(
                            "the index puts `{name}` in {} but that shard does not hold it",
                            file.as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            index,
        })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        let shard = self.index.get(name).ok_or_else(|| {
            AvbError::corrupt(&self.dir, format!("tensor `{name}` is missing from the checkpoint (wrong architecture or an incomplete download?)"))
        })?;
        let s = &self.shards[*shard];
        s.header.tensor(&s.src, name)
    }

    /// A whole tensor as f32, checked against the shape the caller expects.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(name)?.clone();
        if info.shape != expected_shape {
            return Err(AvbError::dimension(
                format!("{} tensor `{name}`", self.dir.display()),
                format!(
                    "shape {:?} but the config implies {expected_shape:?}",
                    info.shape
                ),
                "check that config.json belongs to these weights",
            ));
        }
        let s = &self.shards[self.index[name]];
        let bytes = s
            .src
            .read_vec(info.start, (info.end - info.start) as usize)?;
        if !info.dtype.is_float() {
            return Err(AvbError::unsupported(
                s.src.name(),
                format!("tensor `{name}` is not a float tensor"),
            ));
        }
        let mut out = Vec::new();
        safetensors::decode_f32(info.dtype, &bytes, &mut out);
        Ok(out)
    }

    /// An integer field of config.json (e.g. `hidden_size`), with a clear error when absent.
    pub fn config_usize(&self, key: &str) -> Result<usize> {
        self.config
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                AvbError::corrupt(&self.dir.join("config.json"), format!("no integer `{key}`"))
            })
    }
}
