//! Opening a model by registry name (fetched on first use) or by path (a `.gguf` file or a Hugging Face checkpoint
//! directory), with its tokenizer and chat template.

use crate::model::{Model, Precision};
use crate::weights::WeightSource;
use avb_core::{AvbError, Result};
use avb_model::chat::{ChatTemplate, Message};
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

impl LoadedModel {
    /// The ids of `prompt`: as a user turn in the model's chat template (rendered and tokenized in one step, so
    /// the template's own BOS is not doubled), or as plain text with the model's special tokens.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if !chat {
            return self.tokenizer.encode(prompt, true);
        }
        let template = self.chat.as_ref().ok_or_else(|| {
            AvbError::Invalid(format!("{} has no chat template; drop --chat", self.name))
        })?;
        let text = template.render(&[Message::new("user", prompt)], true)?;
        self.tokenizer.encode(&text, false)
    }
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

/// The tokenizer and chat template that belong to `src` (read from `path`, the file or directory it came from).
pub fn tokenizer_and_template(
    src: &WeightSource,
    path: &Path,
) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    if let Some(g) = src.gguf() {
        return Ok((Tokenizer::from_gguf(g, path)?, ChatTemplate::from_gguf(g)?));
    }
    if let Some(b) = src.bundle() {
        return Ok((Tokenizer::from_bundle(b)?, ChatTemplate::from_bundle(b)?));
    }
    Ok((
        Tokenizer::from_hf_dir(path)?,
        ChatTemplate::from_hf_dir(path)?,
    ))
}

pub fn open(spec: &str, device: &Device, precision: Precision) -> Result<LoadedModel> {
    let (name, path) = resolve(spec)?;
    let (src, config) = WeightSource::open(&path)?;
    let (tokenizer, chat) = tokenizer_and_template(&src, &path)?;
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
    // A bundle is the model it was packed from: maps and sidecars name that model, not the bundle's directory.
    let name = match src.bundle() {
        Some(b) => b.manifest.source.name.clone(),
        None => name,
    };
    Ok(LoadedModel {
        name,
        path,
        model,
        tokenizer,
        chat,
    })
}
