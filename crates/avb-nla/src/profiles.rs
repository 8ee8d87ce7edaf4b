//! Zero-shot verbalizer profiles for models without a trained AV: the NLA sidecar schema plus how the vector
//! enters (embedding replacement or a residual patch at the input of block L), at a scale measured on the model
//! (the mean L2 norm of the residual stream at that site over real text), and how the answer is read.
//!
//! Unlike a trained AV, such a model was never taught to read an injected vector: the prompt asks what the word
//! in the placeholder's place is about, and the model answers from whatever the vector makes that position look
//! like. Shipped profiles are made by `avb profile` (see docs/verbalizers.md) and embedded here.

use crate::protocol;
use crate::sidecar::{
    Extraction, InjectionScale, NlaMeta, PromptTemplates, Role, ScaleMeasurement, Tokens, ZeroShot,
    SCHEMA_VERSION,
};
use avb_core::{AvbError, Result};
use avb_runtime::loader::LoadedModel;
use avb_runtime::model::to_vec;
use avb_runtime::Input;
use std::collections::BTreeMap;

/// Profiles shipped with avb, by registry name (made by `avb profile --model <name> -o profiles/<name>.yaml`).
const BUILTIN: &[(&str, &str)] = &[
    (
        "qwen2.5-coder-0.5b-instruct",
        include_str!("../profiles/qwen2.5-coder-0.5b-instruct.yaml"),
    ),
    (
        "smollm2-135m-instruct",
        include_str!("../profiles/smollm2-135m-instruct.yaml"),
    ),
    (
        "gemma-3-270m",
        include_str!("../profiles/gemma-3-270m.yaml"),
    ),
];

/// Names of the models with a shipped profile.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Placeholders tried in order: the released AVs' characters first (Qwen, Gemma-3, Llama-3.3), then other rare
/// symbols; the first that is one token in the vocabulary and stays one token inside the prompt wins.
const PLACEHOLDERS: &[&str] = &["㈎", "㈜", "㎡", "※", "⁂", "§"];

pub const CHAT_PROMPT: &str =
    "What single topic is the word '{injection_char}' about? Answer with a short phrase.";
pub const RAW_PROMPT: &str =
    "Q: What single topic is the word \"{injection_char}\" about?\nA: The topic is";

#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Block whose input is patched (0 = the input embedding).
    pub injection_layer: usize,
    /// The block whose output the vectors come from (recorded as extraction_layer_index).
    pub extraction_layer: usize,
    /// injection_scale = multiplier x the measured mean norm.
    pub multiplier: f64,
    pub prompt: Option<String>,
    pub max_new_tokens: usize,
    pub corpus_name: String,
    pub model_sha256: String,
}

/// Measure the site's norm on `texts` and write the profile for `lm`.
pub fn make_profile(lm: &LoadedModel, texts: &[String], opts: &ProfileOptions) -> Result<NlaMeta> {
    let c = &lm.model.config;
    if opts.injection_layer >= c.num_layers || opts.extraction_layer >= c.num_layers {
        return Err(AvbError::Invalid(format!(
            "layers {} / {} out of range: {} has blocks 0..={}",
            opts.injection_layer,
            opts.extraction_layer,
            lm.name,
            c.num_layers - 1
        )));
    }
    if !(opts.multiplier.is_finite() && opts.multiplier > 0.0) {
        return Err(AvbError::Invalid(
            "the scale multiplier must be positive".into(),
        ));
    }
    let chat = lm.chat.is_some();
    let template = opts
        .prompt
        .clone()
        .unwrap_or_else(|| if chat { CHAT_PROMPT } else { RAW_PROMPT }.to_string());
    if !template.contains("{injection_char}") {
        return Err(AvbError::Invalid(
            "the prompt has no `{injection_char}`: put it where the vector goes".into(),
        ));
    }
    let norms = site_norms(lm, texts, opts.injection_layer)?;
    let stats = summarize_norms(norms, texts.len(), &opts.corpus_name, opts.multiplier)?;
    let mut last_err = None;
    for ch in PLACEHOLDERS {
        let meta = profile_meta(lm, &template, ch, chat, &stats, opts);
        match meta {
            Ok(m) => return Ok(m),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| AvbError::Invalid("no placeholder candidate".into())))
}

fn profile_meta(
    lm: &LoadedModel,
    template: &str,
    ch: &str,
    chat: bool,
    stats: &ScaleMeasurement,
    opts: &ProfileOptions,
) -> Result<NlaMeta> {
    let alone = lm.tokenizer.encode(ch, false)?;
    let [id] = alone.as_slice() else {
        return Err(AvbError::Invalid(format!("`{ch}` is not one token")));
    };
    let mut meta = NlaMeta {
        kind: "nla_model".into(),
        schema_version: SCHEMA_VERSION,
        role: Role::Av,
        base_checkpoint: Some(lm.name.clone()),
        d_model: lm.model.config.hidden_size,
        extraction_layer_index: opts.extraction_layer,
        extraction: Extraction {
            injection_scale: Some(InjectionScale::Value(stats.mean_norm * stats.multiplier)),
            mse_scale: Some((lm.model.config.hidden_size as f64).sqrt()),
        },
        tokens: Tokens {
            injection_char: ch.to_string(),
            injection_token_id: *id,
            injection_left_neighbor_id: None,
            injection_right_neighbor_id: None,
            critic_suffix_ids: None,
        },
        prompt_templates: PromptTemplates {
            av: Some(template.to_string()),
            ar: None,
        },
        avbridge: Some(ZeroShot {
            model: lm.name.clone(),
            model_sha256: opts.model_sha256.clone(),
            injection_layer: opts.injection_layer,
            chat_template: chat,
            explanation_tags: false,
            stop_strings: vec!["\n".into()],
            max_new_tokens: opts.max_new_tokens,
            scale_rule: format!(
                "{} x the mean L2 norm of the residual stream at the input of block {} (0 = the scaled input embedding) over the tokens of {} texts of {}, the first token of each text left out (attention-sink outliers)",
                stats.multiplier, opts.injection_layer, stats.n_texts, stats.corpus
            ),
            scale_measured: stats.clone(),
            notes: "zero-shot profile: the model was never trained to read injected vectors; it is asked what the placeholder word is about and answers from what the patched residual stream makes that position look like".into(),
        }),
        other: BTreeMap::new(),
    };
    // Neighbours as they come out of the real prompt: the site is then checked exactly like a trained AV's.
    let prompt =
        protocol::build_prompt(&meta, &lm.tokenizer, lm.chat.as_ref(), 1).map_err(|_| {
            AvbError::Invalid(format!("`{ch}` does not stay one token inside the prompt"))
        })?;
    let site = prompt.sites[0];
    meta.tokens.injection_left_neighbor_id = site.checked_sub(1).map(|p| prompt.ids[p]);
    meta.tokens.injection_right_neighbor_id = prompt.ids.get(site + 1).copied();
    Ok(meta)
}

/// L2 norms of the residual stream at the input of block `layer`, every token but each text's first.
fn site_norms(lm: &LoadedModel, texts: &[String], layer: usize) -> Result<Vec<f64>> {
    let d = lm.model.config.hidden_size;
    let mut norms = Vec::new();
    for text in texts {
        let mut ids = lm.tokenizer.encode(text, true)?;
        ids.truncate(64);
        if ids.len() < 2 {
            continue;
        }
        let h = to_vec(lm.model.residual_at_input(&[Input::ids(ids)], layer)?)?;
        norms.extend(h.chunks(d).skip(1).map(|row| {
            row.iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt()
        }));
    }
    Ok(norms)
}

fn summarize_norms(
    mut norms: Vec<f64>,
    n_texts: usize,
    corpus: &str,
    multiplier: f64,
) -> Result<ScaleMeasurement> {
    if norms.is_empty() {
        return Err(AvbError::Invalid(
            "no tokens to measure the injection site's norm on (give texts of two tokens or more)"
                .into(),
        ));
    }
    norms.sort_by(f64::total_cmp);
    let q = |f: f64| norms[((norms.len() - 1) as f64 * f).round() as usize];
    Ok(ScaleMeasurement {
        corpus: corpus.to_string(),
        n_texts,
        n_tokens: norms.len(),
        mean_norm: norms.iter().sum::<f64>() / norms.len() as f64,
        median_norm: q(0.5),
        p10_norm: q(0.1),
        p90_norm: q(0.9),
        multiplier,
    })
}
