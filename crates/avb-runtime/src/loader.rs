//! Opening a model by registry name (fetched on first use) or by path (a `.gguf` file or a Hugging Face checkpoint
//! directory), with its tokenizer and chat template.

use crate::model::{Model, Precision};
use crate::weights::WeightSource;
use avb_core::{AvbError, Result};
use avb_model::chat::ChatTemplate;
use avb_model::registry;
use avb_model::tokenizer::Tokenizer;
use burn::tensor::Device;
use std::path::{Path, PathBuf};

pub struct LoadedModel {
    /// The registry name, or the file / directory name.
    pub name: String,
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
}

/// Resolve `spec` to a path: an existing file or directory, else a registry name (fetched if not cached).
pub fn resolve(spec: &str) -> Result<(String, PathBuf)> {
    let p = Path::new(spec);
    if p.exists() {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok((name, p.to_path_buf()));
    }
    if spec.contains('/') || spec.ends_with(".gguf") {
        return Err(AvbError::Invalid(format!(
            "{spec}: no such file or directory (give a .gguf file, a Hugging Face checkpoint directory, or a name from `avb models list`)"
        )));
    }
    Ok((spec.to_string(), registry::ensure(spec)?))
}

pub fn open(spec: &str, device: &Device, precision: Precision) -> Result<LoadedModel> {
    let (name, path) = resolve(spec)?;
    let (src, config) = WeightSource::open(&path)?;
    let (tokenizer, chat) = match src.gguf() {
        Some(g) => (Tokenizer::from_gguf(g, &path)?, ChatTemplate::from_gguf(g)?),
        None => (
            Tokenizer::from_hf_dir(&path)?,
            ChatTemplate::from_hf_dir(&path)?,
        ),
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(AvbError::dimension(
            format!("{} tokenizer", path.display()),
            format!(
                "{} tokens but the model's embedding has {} rows",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
            "use the tokenizer that belongs to these weights",
        ));
    }
    let model = Model::from_source(&src, config, device, precision)?;
    Ok(LoadedModel {
        name,
        path,
        model,
        tokenizer,
        chat,
    })
}
