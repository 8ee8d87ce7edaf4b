//! Tokenizers built from GGUF metadata, equal to what Hugging Face transformers builds from the same file:
//! gpt2-style byte-level BPE (Qwen2, SmolLM2) from `tokenizer.ggml.tokens` + `merges`, with the pre-tokenizer
//! named by `tokenizer.ggml.pre`; control tokens (type 3) become special added tokens, user-defined ones (type 4)
//! plain added tokens; and Gemma's SentencePiece vocabulary (`tokenizer.ggml.model = llama`) as BPE with byte fallback.

use crate::bundle::{self, Bundle, TokenizerSettings};
use crate::gguf::{Gguf, MetaValue};
use avb_core::{AvbError, Result};
use serde_json::json;
use std::collections::HashMap;
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
    /// tokenizer.json's post-processor adds the special tokens itself; GGUF-built tokenizers have none.
    post_processor: bool,
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

/// Added-token entries as transformers makes them from a GGUF: control tokens (type 3) special, user-defined ones
/// (type 4) plain, both matched whole in text. A token is added only where its own spelling is in the vocabulary
/// (`vocab`), so a respelled entry is not duplicated; `control_ok` drops control tokens transformers drops.
fn added_tokens(
    tokens: &[&str],
    types: &[i64],
    vocab: &HashMap<&str, usize>,
    control_ok: impl Fn(&str) -> bool,
) -> Vec<serde_json::Value> {
    let mut seen = std::collections::HashSet::new();
    tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| match **ty {
            TOKEN_CONTROL => control_ok(t),
            TOKEN_USER_DEFINED => true,
            _ => false,
        })
        .filter_map(|(t, ty)| {
            let id = *vocab.get(t)?;
            seen.insert(id).then(|| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *ty == TOKEN_CONTROL}))
        })
        .collect()
}

/// Token -> id, the last id winning for a spelling that occurs twice (as a Python dict built in order), and the
/// spellings in first-occurrence order.
fn index_tokens(tokens: &[String]) -> (HashMap<&str, usize>, Vec<&str>) {
    let mut index = HashMap::new();
    let mut order = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if index.insert(t.as_str(), i).is_none() {
            order.push(t.as_str());
        }
    }
    (index, order)
}

/// GPT-2's byte-to-character alphabet: printable Latin-1 maps to itself, the other 68 bytes to U+0100..U+0143.
fn byte_level_char(byte: u8) -> char {
    let b = u32::from(byte);
    if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
        return char::from(byte);
    }
    let rank = (0..b)
        .filter(|x| !((33..=126).contains(x) || (161..=172).contains(x) || (174..=255).contains(x)))
        .count() as u32;
    char::from_u32(256 + rank).unwrap_or('\u{FFFD}')
}

fn in_byte_alphabet(c: char) -> bool {
    let c = c as u32;
    (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=323).contains(&c)
}

fn byte_level_spec(
    g: &Gguf,
    tokens: &[&str],
    types: &[i64],
    path: &Path,
) -> Result<serde_json::Value> {
    let merges = strings(g, "tokenizer.ggml.merges", path)?;
    // Tokens spelled outside the byte alphabet are respelled byte by byte, as transformers does.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(in_byte_alphabet) {
                t.to_string()
            } else {
                t.bytes().map(byte_level_char).collect()
            }
        })
        .collect();
    let (index, order) = index_tokens(&spelled);
    let vocab: serde_json::Map<String, serde_json::Value> = order
        .iter()
        .map(|t| (t.to_string(), json!(index[t])))
        .collect();
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| AvbError::corrupt(path, format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<_>>()?;
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
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types, &index, |t| t.chars().all(in_byte_alphabet)),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// Gemma's SentencePiece vocabulary as a BPE with byte fallback, built the way transformers builds it from GGUF:
/// whitespace-only tokens are respelled with U+2581 (the file stores real spaces), and since the file has no
/// merges they are recovered from the vocabulary, ranked by the token's position in the file (Gemma's scores do
/// not follow its merge order).
fn gemma_spec(tokens: &[&str], types: &[i64]) -> serde_json::Value {
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    let (index, order) = index_tokens(&respelled);
    // (left, right, rank of the merged token); within a token, pairs ordered by the ids of their pieces.
    let mut merges: Vec<(&str, &str, usize)> = Vec::new();
    for merged in &order {
        let rank = index[merged];
        let start = merges.len();
        for (cut, _) in merged.char_indices().skip(1) {
            let (l, r) = merged.split_at(cut);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push((l, r, rank));
            }
        }
        merges[start..].sort_by_key(|(l, r, _)| (index[l], index[r]));
    }
    // Best first: lower rank, then longer left piece, then longer right piece; stable otherwise.
    merges.sort_by(|a, b| {
        a.2.cmp(&b.2)
            .then(b.0.chars().count().cmp(&a.0.chars().count()))
            .then(b.1.chars().count().cmp(&a.1.chars().count()))
    });
    let vocab: serde_json::Map<String, serde_json::Value> = order
        .iter()
        .map(|t| (t.to_string(), json!(index[t])))
        .collect();
    let merges: Vec<serde_json::Value> = merges.iter().map(|(l, r, _)| json!([l, r])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types, &index, |_| true),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

/// `tokenizer_config.json` of a checkpoint directory (an empty object when absent).
pub fn hf_tokenizer_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(json!({}));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| AvbError::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| AvbError::corrupt(&path, format!("not valid JSON ({e})")))
}

/// A special token of tokenizer_config.json, written either as a string or as `{"content": ...}`.
pub fn special_token_content(config: &serde_json::Value, key: &str) -> Option<String> {
    let v = config.get(key)?;
    v.as_str()
        .or_else(|| v.get("content").and_then(serde_json::Value::as_str))
        .map(str::to_string)
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf, path: &Path) -> Result<Tokenizer> {
        let model = g
            .meta("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        let arch = g
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        let tokens = strings(g, "tokenizer.ggml.tokens", path)?;
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
        let spec = match (model, arch) {
            ("gpt2", _) => byte_level_spec(g, &tokens, &types, path)?,
            ("llama", "gemma" | "gemma2" | "gemma3") => gemma_spec(&tokens, &types),
            _ => {
                return Err(AvbError::unsupported(
                    path,
                    format!("tokenizer.ggml.model `{model}` for architecture `{arch}`: avb builds gpt2-style byte-level BPE and Gemma's SentencePiece vocabularies"),
                ))
            }
        };
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            AvbError::corrupt(
                path,
                format!("cannot build the tokenizer from the GGUF vocabulary ({e})"),
            )
        })?;
        let id = |key: &str| g.meta(key).and_then(MetaValue::as_i64).map(|v| v as u32);
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise (and transformers follows).
        let add_bos = match g.meta("tokenizer.ggml.add_bos_token") {
            Some(MetaValue::Bool(b)) => *b,
            _ => model == "llama",
        };
        Ok(Tokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos,
            post_processor: false,
        })
    }

    /// From a Hugging Face checkpoint directory: `tokenizer.json`, with BOS/EOS named by
    /// `tokenizer_config.json` (its post-processor adds the special tokens).
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| AvbError::io(&path, e))?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| AvbError::corrupt(&path, format!("not a tokenizers JSON file ({e})")))?;
        let config = hf_tokenizer_config(dir)?;
        let id =
            |key: &str| special_token_content(&config, key).and_then(|t| inner.token_to_id(&t));
        let bos = id("bos_token");
        Ok(Tokenizer {
            bos,
            eos: id("eos_token"),
            add_bos: config
                .get("add_bos_token")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            post_processor: true,
            inner,
        })
    }

    /// The tokenizer of a web bundle: tokenizer.json plus the settings its manifest records.
    pub fn from_bundle(b: &Bundle) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = b.text(bundle::TOKENIZER)?.parse().map_err(|e| {
            AvbError::corrupt(
                b.name(),
                format!("{} is not a tokenizers JSON file ({e})", bundle::TOKENIZER),
            )
        })?;
        let t = &b.manifest.tokenizer;
        Ok(Tokenizer {
            inner,
            bos: t.bos,
            eos: t.eos,
            add_bos: t.add_bos,
            post_processor: t.post_processor,
        })
    }

    /// tokenizer.json and the settings a web bundle records next to it.
    pub fn bundle_parts(&self) -> Result<(String, TokenizerSettings)> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| AvbError::Invalid(format!("cannot serialize the tokenizer: {e}")))?;
        Ok((
            json,
            TokenizerSettings {
                bos: self.bos,
                eos: self.eos,
                add_bos: self.add_bos,
                post_processor: self.post_processor,
            },
        ))
    }

    /// Token ids of `text`; special-token strings in the text map to their ids. With `add_special`, BOS is
    /// prepended when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| AvbError::Invalid(format!("tokenizing failed: {e}")))?;
        if self.post_processor {
            let enc = self
                .inner
                .encode(text, add_special)
                .map_err(|e| AvbError::Invalid(format!("tokenizing failed: {e}")))?;
            return Ok(enc.get_ids().to_vec());
        }
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Truncate encodings to `max_length` tokens (special tokens included) and never pad: what
    /// sentence-transformers asks of an encoder's tokenizer, whatever tokenizer.json itself says.
    pub fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        self.inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| AvbError::Invalid(format!("cannot set truncation: {e}")))?;
        self.inner.with_padding(None);
        Ok(())
    }

    /// The id of a token spelled exactly `token` (a special token such as `<end_of_turn>`, or a vocabulary entry).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end a generated turn: EOS and the chat formats' end-of-turn tokens present in the vocabulary.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.into_iter().collect();
        for t in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = self.token_id(t) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| AvbError::Invalid(format!("detokenizing failed: {e}")))
    }

    /// The tokenizer as Hugging Face files: (`tokenizer.json`, `tokenizer_config.json`). A GGUF-built tokenizer
    /// gets a post-processor that adds BOS when the model wants it, so `from_hf_dir` reads back the same ids.
    pub fn to_hf_files(&self) -> Result<(String, String)> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| AvbError::Invalid(format!("cannot serialize the tokenizer: {e}")))?;
        let mut spec: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| AvbError::Invalid(format!("cannot serialize the tokenizer: {e}")))?;
        let token = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        if !self.post_processor && self.add_bos {
            if let (Some(id), Some(bos)) = (self.bos, token(self.bos)) {
                spec["post_processor"] = json!({
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}},
                });
            }
        }
        let config = json!({
            "bos_token": token(self.bos),
            "eos_token": token(self.eos),
            "add_bos_token": self.add_bos,
        });
        Ok((spec.to_string(), config.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Streaming detokenization: text is released only once it decodes completely, so a character split over several
/// tokens (partial UTF-8 or byte-fallback pieces) is never printed half-way.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        StreamDecoder {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take_new(&text))
    }

    /// Whatever is still held back (an incomplete character at the very end decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(self.take_new(&text))
    }

    fn take_new(&mut self, text: &str) -> String {
        // Decoding more tokens only appends, except where a tokenizer rewrites the tail; then emit what differs.
        let start = if text.len() >= self.emitted && text.is_char_boundary(self.emitted) {
            self.emitted
        } else {
            text.len()
        };
        self.emitted = text.len();
        text[start..].to_string()
    }
}
