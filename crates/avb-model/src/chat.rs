//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template`, or tokenizer_config.json's
//! `chat_template`), rendered the way transformers' `apply_chat_template` does (a sandboxed Jinja2 environment with
//! trim_blocks, lstrip_blocks and loop controls; `raise_exception` available). The rendered text already holds any
//! BOS the template writes, so it is tokenized once, without adding special tokens (nla-protocol.md: the
//! double-BOS trap).

use crate::bundle::{Bundle, ChatTemplateSettings};
use crate::gguf::{Gguf, MetaValue};
use avb_core::{AvbError, Result};
use minijinja::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// `{"role": ..., "content": ...}` as templates index it (`message['role']` or `message.role`).
    fn to_value(&self) -> Value {
        let mut m = BTreeMap::new();
        m.insert("role".to_string(), Value::from(self.role.clone()));
        m.insert("content".to_string(), Value::from(self.content.clone()));
        Value::from(m)
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compile a template; `bos_token` / `eos_token` are the strings templates refer to.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| AvbError::Invalid(format!("jinja syntax config: {e}")))?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| AvbError::Invalid(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template a GGUF carries (None when it has none, as Gemma-3-270M's base GGUF).
    pub fn from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>> {
        let Some(source) = g
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
        else {
            return Ok(None);
        };
        let token = |key: &str| -> String {
            let id = g.meta(key).and_then(MetaValue::as_i64);
            let tokens = g
                .meta("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array);
            id.zip(tokens)
                .and_then(|(i, t)| t.get(i as usize))
                .and_then(MetaValue::as_str)
                .unwrap_or("")
                .to_string()
        };
        ChatTemplate::new(
            source,
            &token("tokenizer.ggml.bos_token_id"),
            &token("tokenizer.ggml.eos_token_id"),
        )
        .map(Some)
    }

    /// From a Hugging Face checkpoint directory: `chat_template.jinja`, or `chat_template` in
    /// tokenizer_config.json (a string, or a list of named templates of which `default` is used).
    pub fn from_hf_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config = crate::tokenizer::hf_tokenizer_config(dir)?;
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja).map_err(|e| AvbError::io(&jinja, e))?
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|t| t.as_str()))
                    .map(str::to_string)
                    .unwrap_or_default(),
                _ => return Ok(None),
            }
        };
        let token =
            |k: &str| crate::tokenizer::special_token_content(&config, k).unwrap_or_default();
        ChatTemplate::new(&source, &token("bos_token"), &token("eos_token")).map(Some)
    }

    /// The template of a web bundle, when it has one.
    pub fn from_bundle(b: &Bundle) -> Result<Option<ChatTemplate>> {
        match &b.manifest.chat_template {
            Some(t) => ChatTemplate::new(&b.text(&t.file)?, &t.bos_token, &t.eos_token).map(Some),
            None => Ok(None),
        }
    }

    /// What a web bundle records: the source and the special-token strings it refers to.
    pub fn bundle_settings(&self, file: &str) -> (&str, ChatTemplateSettings) {
        (
            &self.source,
            ChatTemplateSettings {
                file: file.to_string(),
                bos_token: self.bos_token.clone(),
                eos_token: self.eos_token.clone(),
            },
        )
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("registered in new()");
        tmpl.render(minijinja::context! {
            messages => Value::from(messages.iter().map(Message::to_value).collect::<Vec<_>>()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| AvbError::Invalid(format!("rendering the chat template failed: {e}")))
    }
}
