//! `nla_meta.yaml`, the NLA release's sidecar (schema_version 2), and avbridge's zero-shot verbalizer profiles,
//! which use the same schema plus an `avbridge` block (tools that do not know it ignore it).
//!
//! A trained AV replaces the placeholder's input embedding with the vector rescaled to `injection_scale`, reads a
//! chat-formatted prompt and writes `<explanation>...</explanation>`. A zero-shot profile may instead patch the
//! residual stream at the input of a later block, at a scale measured on the model, and read plain text.

use avb_core::{AvbError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 2;
pub const DEFAULT_AV_TEMPLATE: &str = "You are a meticulous AI researcher conducting an important investigation into activation vectors from a language model. Your overall task is to describe the semantic content of that activation vector.\n\nWe will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation.";
pub const DEFAULT_AR_TEMPLATE: &str =
    "Summary of the following text: <text>{explanation}</text> <summary>";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Av,
    Ar,
}

/// `injection_scale`: a float, null (inject the vector as given), or the string `sqrt_d_model`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InjectionScale {
    Value(f64),
    Named(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Extraction {
    #[serde(default)]
    pub injection_scale: Option<InjectionScale>,
    #[serde(default)]
    pub mse_scale: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tokens {
    pub injection_char: String,
    pub injection_token_id: u32,
    #[serde(default)]
    pub injection_left_neighbor_id: Option<u32>,
    #[serde(default)]
    pub injection_right_neighbor_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critic_suffix_ids: Option<Vec<u32>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptTemplates {
    #[serde(default)]
    pub av: Option<String>,
    #[serde(default)]
    pub ar: Option<String>,
}

/// How the generated text is read: the NLA format (`<explanation>` tags) or plain text up to a stop string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZeroShot {
    /// Registry name or file name of the model the profile was measured on.
    pub model: String,
    /// sha256 of the model file the scale was measured on.
    pub model_sha256: String,
    /// 0: replace the input embedding (the NLA protocol); L > 0: replace the residual stream at the input of
    /// block L (Patchscopes / SelfIE).
    pub injection_layer: usize,
    /// Wrap the prompt as one user turn with the model's chat template (instruct models); else raw text.
    pub chat_template: bool,
    pub explanation_tags: bool,
    pub stop_strings: Vec<String>,
    pub max_new_tokens: usize,
    /// How `injection_scale` was obtained, in words, and the numbers behind it.
    pub scale_rule: String,
    pub scale_measured: ScaleMeasurement,
    pub notes: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScaleMeasurement {
    pub corpus: String,
    pub n_texts: usize,
    pub n_tokens: usize,
    pub mean_norm: f64,
    pub median_norm: f64,
    pub p10_norm: f64,
    pub p90_norm: f64,
    /// injection_scale = multiplier * mean_norm.
    pub multiplier: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NlaMeta {
    pub kind: String,
    pub schema_version: u32,
    pub role: Role,
    #[serde(default)]
    pub base_checkpoint: Option<String>,
    pub d_model: usize,
    pub extraction_layer_index: usize,
    #[serde(default)]
    pub extraction: Extraction,
    pub tokens: Tokens,
    #[serde(default)]
    pub prompt_templates: PromptTemplates,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avbridge: Option<ZeroShot>,
    /// Provenance and any field this version does not interpret, kept as read.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml_ng::Value>,
}

impl NlaMeta {
    pub fn from_yaml(text: &str, path: &Path) -> Result<NlaMeta> {
        let raw: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .map_err(|e| AvbError::corrupt(path, format!("not valid YAML ({e})")))?;
        let version = raw
            .get("schema_version")
            .and_then(serde_yaml_ng::Value::as_u64);
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(AvbError::unsupported(
                path,
                format!(
                    "nla_meta schema_version {version:?}: this avb reads schema_version {SCHEMA_VERSION} (the NLA release's); re-export the sidecar or upgrade avb"
                ),
            ));
        }
        let meta: NlaMeta = serde_yaml_ng::from_value(raw)
            .map_err(|e| AvbError::corrupt(path, format!("not an nla_meta sidecar ({e})")))?;
        if meta.kind != "nla_model" {
            return Err(AvbError::corrupt(
                path,
                format!(
                    "kind `{}`; an NLA sidecar says `kind: nla_model`",
                    meta.kind
                ),
            ));
        }
        meta.check(path)?;
        Ok(meta)
    }

    pub fn read(path: &Path) -> Result<NlaMeta> {
        let text = std::fs::read_to_string(path).map_err(|e| AvbError::io(path, e))?;
        NlaMeta::from_yaml(&text, path)
    }

    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml_ng::to_string(self)
            .map_err(|e| AvbError::Invalid(format!("cannot write the sidecar as YAML: {e}")))
    }

    fn check(&self, path: &Path) -> Result<()> {
        if self.tokens.injection_char.is_empty() {
            return Err(AvbError::corrupt(path, "tokens.injection_char is empty"));
        }
        if self.role == Role::Av && !self.av_template().contains("{injection_char}") {
            return Err(AvbError::corrupt(
                path,
                "prompt_templates.av has no `{injection_char}` placeholder: the vector would have no site; put `{injection_char}` where the vector goes",
            ));
        }
        if self.role == Role::Ar && !self.ar_template().contains("{explanation}") {
            return Err(AvbError::corrupt(
                path,
                "prompt_templates.ar has no `{explanation}` placeholder",
            ));
        }
        if let Some(InjectionScale::Named(n)) = &self.extraction.injection_scale {
            if n != "sqrt_d_model" {
                return Err(AvbError::corrupt(
                    path,
                    format!("extraction.injection_scale `{n}`: expected a number, null or `sqrt_d_model`"),
                ));
            }
        }
        if let Some(InjectionScale::Value(v)) = &self.extraction.injection_scale {
            if !(v.is_finite() && *v > 0.0) {
                return Err(AvbError::corrupt(
                    path,
                    format!("extraction.injection_scale {v} is not a positive number"),
                ));
            }
        }
        if let Some(z) = &self.avbridge {
            if z.max_new_tokens == 0 {
                return Err(AvbError::corrupt(path, "avbridge.max_new_tokens is 0"));
            }
        }
        Ok(())
    }

    /// The AV prompt template (the NLA default when the sidecar has none).
    pub fn av_template(&self) -> &str {
        self.prompt_templates
            .av
            .as_deref()
            .unwrap_or(DEFAULT_AV_TEMPLATE)
    }

    pub fn ar_template(&self) -> &str {
        self.prompt_templates
            .ar
            .as_deref()
            .unwrap_or(DEFAULT_AR_TEMPLATE)
    }

    /// The L2 norm the injected vector is rescaled to; None leaves it as given.
    pub fn injection_norm(&self) -> Option<f64> {
        match &self.extraction.injection_scale {
            Some(InjectionScale::Value(v)) => Some(*v),
            Some(InjectionScale::Named(_)) => Some((self.d_model as f64).sqrt()),
            None => None,
        }
    }

    pub fn mse_scale(&self) -> f64 {
        self.extraction
            .mse_scale
            .unwrap_or_else(|| (self.d_model as f64).sqrt())
    }

    pub fn injection_layer(&self) -> usize {
        self.avbridge.as_ref().map_or(0, |z| z.injection_layer)
    }

    pub fn uses_chat_template(&self) -> bool {
        self.avbridge.as_ref().is_none_or(|z| z.chat_template)
    }

    pub fn explanation_tags(&self) -> bool {
        self.avbridge.as_ref().is_none_or(|z| z.explanation_tags)
    }

    pub fn stop_strings(&self) -> Vec<String> {
        match &self.avbridge {
            Some(z) => z.stop_strings.clone(),
            None => vec!["</explanation>".to_string()],
        }
    }

    pub fn max_new_tokens(&self) -> usize {
        self.avbridge.as_ref().map_or(200, |z| z.max_new_tokens)
    }

    pub fn is_zero_shot(&self) -> bool {
        self.avbridge.is_some()
    }
}
