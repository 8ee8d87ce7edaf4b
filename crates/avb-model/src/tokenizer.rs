//! Tokenizers built from GGUF metadata, equal to what Hugging Face transformers builds from the same file:
//! gpt2-style byte-level BPE (Qwen2, SmolLM2) from `tokenizer.ggml.tokens` + `merges`, with the pre-tokenizer
//! named by `tokenizer.ggml.pre`; control tokens (type 3) become special added tokens, user-defined ones (type 4)
//! plain added tokens. SentencePiece vocabularies (`tokenizer.ggml.model = llama`, Gemma) are not built yet.

use crate::gguf::{Gguf, MetaValue};
use avb_core::{AvbError, Result};
use serde_json::json;
use std::path::Path;

/// Qwen2's split pattern (its tokenizer.json and llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects BOS in front of every sequence (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

fn strings<'a>(g: &'a Gguf, key: &str, path: &Path) -> Result<Vec<&'a str>> {
    g.meta(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| AvbError::corrupt(path, format!("GGUF has no `{key}` array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| AvbError::corrupt(path, format!("`{key}` holds a non-string")))
        })
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf, path: &Path) -> Result<Tokenizer> {
        let model = g
            .meta("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(AvbError::unsupported(
                path,
                format!("tokenizer.ggml.model `{model}`: avb builds gpt2-style byte-level BPE vocabularies so far (SentencePiece vocabularies such as Gemma's are not supported yet)"),
            ));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens", path)?;
        let merges = strings(g, "tokenizer.ggml.merges", path)?;
        let types: Vec<i64> = match g
            .meta("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
        {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(AvbError::corrupt(
                path,
                format!("{} token types for {} tokens", types.len(), tokens.len()),
            ));
        }
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let merges: Vec<serde_json::Value> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        AvbError::corrupt(path, format!("merge `{m}` is not two tokens"))
                    })
            })
            .collect::<Result<_>>()?;
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TOKEN_CONTROL || **t == TOKEN_USER_DEFINED)
            .map(|(i, t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *t == TOKEN_CONTROL}))
            .collect();
        let pre = g
            .meta("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let pre_tokenizer = match pre {
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
            // GPT-2's own pattern inside ByteLevel: what transformers builds for the other gpt2-style GGUFs.
            _ => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            AvbError::corrupt(
                path,
                format!("cannot build the tokenizer from the GGUF vocabulary ({e})"),
            )
        })?;
        let id = |key: &str| g.meta(key).and_then(MetaValue::as_i64).map(|v| v as u32);
        Ok(Tokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: matches!(
                g.meta("tokenizer.ggml.add_bos_token"),
                Some(MetaValue::Bool(true))
            ),
        })
    }

    /// Token ids of `text`; special-token strings in the text map to their ids. With `add_special`, BOS is
    /// prepended when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| AvbError::Invalid(format!("tokenizing failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| AvbError::Invalid(format!("detokenizing failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
