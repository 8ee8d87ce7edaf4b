//! The decoder hyper-parameters the runtime needs, read from a Hugging Face `config.json` or from GGUF metadata.
//! Family-specific defaults and naming live in the family files; this file holds what they share.

use crate::{gemma3, llama, qwen2};
use avb_core::io::RangeSource;
use avb_core::{AvbError, Result};
use avb_model::gguf::{Gguf, MetaValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Qwen2,
    Llama,
    Gemma3,
}

/// How RoPE frequencies are derived from the base frequencies `1 / theta^(2i/d)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeScaling {
    None,
    /// Divide every frequency by `factor` (Gemma-3's global layers in the 4B+ models).
    Linear {
        factor: f32,
    },
    /// Llama-3.1+ frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_positions: f32,
    },
    /// Per-frequency divisors stored by llama.cpp as the `rope_freqs.weight` tensor.
    Divisors(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl Rope {
    /// Inverse frequencies for a head of `dim`, computed in f32 the way transformers computes them.
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / self.theta.powf(i as f32 / dim as f32))
            .collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Divisors(d) => base.iter().zip(d).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let low_wavelen = original_max_positions / low_freq_factor;
                let high_wavelen = original_max_positions / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (original_max_positions / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Serialized as is into web bundles (their `config`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    /// Biases on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    pub tie_embeddings: bool,
    /// RoPE of the global (full-attention) layers.
    pub rope: Rope,
    /// RoPE of the sliding-window layers where it differs (Gemma-3's local base frequency).
    pub rope_local: Option<Rope>,
    /// Per layer: `Some(w)` for a sliding-window layer that sees the last `w` positions.
    pub windows: Vec<Option<usize>>,
    /// Multiplier of q.k (1/sqrt(head_dim), or 1/sqrt(query_pre_attn_scalar) for Gemma-3).
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub max_positions: usize,
}

/// The dimensions every family shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl ModelConfig {
    /// Weights of one block's projections (q, k, v, o, gate, up, down); biases and norms left out.
    pub fn block_projection_weights(&self) -> u64 {
        let (d, f) = (self.hidden_size as u64, self.intermediate_size as u64);
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        2 * d * q + 2 * d * kv + 3 * d * f
    }

    /// A plain decoder of `shape`: global attention everywhere, 1/sqrt(head_dim) scaling, no biases, no
    /// soft-capping, untied head. Family files override what differs.
    pub(crate) fn base(
        family: Family,
        s: Shape,
        rms_eps: f64,
        rope: Rope,
        max_positions: usize,
    ) -> Self {
        ModelConfig {
            family,
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            intermediate_size: s.intermediate_size,
            num_layers: s.num_layers,
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            rms_eps,
            qkv_bias: false,
            tie_embeddings: false,
            rope,
            rope_local: None,
            windows: vec![None; s.num_layers],
            attn_scale: (s.head_dim as f32).powf(-0.5),
            attn_softcap: None,
            final_softcap: None,
            max_positions,
        }
    }

    /// From a Hugging Face `config.json` (a multimodal Gemma-3 config is read through its `text_config`).
    pub fn from_hf(config: &Value, path: &Path) -> Result<ModelConfig> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let text = match config.get("text_config") {
            Some(t) if model_type == "gemma3" => t,
            _ => config,
        };
        let hf = HfConfig { v: text, path };
        let cfg = match model_type {
            "qwen2" => qwen2::config_from_hf(&hf)?,
            "llama" => llama::config_from_hf(&hf)?,
            "gemma3" | "gemma3_text" => gemma3::config_from_hf(&hf)?,
            other => {
                return Err(AvbError::unsupported(
                    path,
                    format!("model_type `{other}`: avb runs the qwen2, llama and gemma3 families"),
                ))
            }
        };
        cfg.validate(path)
    }

    /// From GGUF metadata (`general.architecture` and `<arch>.*` keys), as llama.cpp writes them.
    pub fn from_gguf(g: &Gguf, src: &dyn RangeSource) -> Result<ModelConfig> {
        let path = src.name();
        let arch = g
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        let meta = GgufMeta { g, arch, path };
        let cfg = match arch {
            "qwen2" => qwen2::config_from_gguf(&meta)?,
            "llama" => {
                let divisors = match g.tensor("rope_freqs.weight") {
                    Some(_) => Some(g.read_f32(src, "rope_freqs.weight")?),
                    None => None,
                };
                llama::config_from_gguf(&meta, divisors)?
            }
            "gemma3" => gemma3::config_from_gguf(&meta)?,
            other => {
                return Err(AvbError::unsupported(
                    path,
                    format!(
                        "GGUF architecture `{other}`: avb runs the qwen2, llama and gemma3 families"
                    ),
                ))
            }
        };
        cfg.validate(path)
    }

    fn validate(self, path: &Path) -> Result<ModelConfig> {
        let bad = |what: String| {
            Err(AvbError::corrupt(
                path,
                format!("inconsistent model configuration: {what}"),
            ))
        };
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad(format!(
                "{} attention heads cannot share {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_layers == 0 {
            return bad("zero hidden size, vocabulary or layer count".into());
        }
        if self.windows.len() != self.num_layers {
            return bad(format!(
                "{} layer types for {} layers",
                self.windows.len(),
                self.num_layers
            ));
        }
        if let RopeScaling::Divisors(d) = &self.rope.scaling {
            if d.len() != self.head_dim / 2 {
                return bad(format!(
                    "{} RoPE divisors for head_dim {}",
                    d.len(),
                    self.head_dim
                ));
            }
        }
        Ok(self)
    }
}

/// Typed access to a config.json object with errors that name the file and the key.
pub(crate) struct HfConfig<'a> {
    pub v: &'a Value,
    pub path: &'a Path,
}

impl HfConfig<'_> {
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key).ok_or_else(|| {
            AvbError::corrupt(self.path, format!("config.json has no integer `{key}`"))
        })
    }
    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.v.get(key).and_then(Value::as_u64).map(|v| v as usize)
    }
    pub fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.v.get(key).and_then(Value::as_f64).unwrap_or(default)
    }
    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.v.get(key).and_then(Value::as_f64).map(|v| v as f32)
    }
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.v.get(key).and_then(Value::as_bool).unwrap_or(default)
    }

    /// The shared shape fields; `head_dim` defaults to hidden / heads.
    pub fn shape(&self) -> Result<Shape> {
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        Ok(Shape {
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: self.opt_usize("num_key_value_heads").unwrap_or(num_heads),
            head_dim: self
                .opt_usize("head_dim")
                .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
        })
    }

    /// `ModelConfig::base` from this config's shape, `rms_norm_eps` and `max_position_embeddings`.
    pub fn base(&self, family: Family, rope: Rope, default_context: usize) -> Result<ModelConfig> {
        Ok(ModelConfig::base(
            family,
            self.shape()?,
            self.f64_or("rms_norm_eps", 1e-6),
            rope,
            self.opt_usize("max_position_embeddings")
                .unwrap_or(default_context),
        ))
    }

    /// RoPE from a flat parameter object: transformers 5 `rope_parameters`, or the older `rope_theta` +
    /// `rope_scaling` pair.
    pub fn rope(&self, params: Option<&Value>, default_theta: f32) -> Result<Rope> {
        let (theta, scaling) = match params {
            Some(p) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .map(|v| v as f32),
                Some(p),
            ),
            None => (
                self.opt_f32("rope_theta"),
                self.v.get("rope_scaling").filter(|s| !s.is_null()),
            ),
        };
        Ok(Rope {
            theta: theta.unwrap_or(default_theta),
            scaling: match scaling {
                Some(s) => self.rope_scaling(s)?,
                None => RopeScaling::None,
            },
        })
    }

    fn rope_scaling(&self, s: &Value) -> Result<RopeScaling> {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f32> {
            s.get(key)
                .and_then(Value::as_f64)
                .map(|v| v as f32)
                .ok_or_else(|| {
                    AvbError::corrupt(
                        self.path,
                        format!("RoPE scaling `{kind}` without a numeric `{key}`"),
                    )
                })
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_positions: num("original_max_position_embeddings")?,
            }),
            other => Err(AvbError::unsupported(
                self.path,
                format!("RoPE scaling `{other}` (avb supports default, linear and llama3)"),
            )),
        }
    }
}

/// Typed access to `<arch>.*` GGUF metadata.
pub(crate) struct GgufMeta<'a> {
    pub g: &'a Gguf,
    pub arch: &'a str,
    pub path: &'a Path,
}

impl GgufMeta<'_> {
    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.g
            .meta(&format!("{}.{key}", self.arch))
            .and_then(MetaValue::as_i64)
            .and_then(|v| usize::try_from(v).ok())
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key).ok_or_else(|| {
            AvbError::corrupt(
                self.path,
                format!("GGUF metadata has no integer `{}.{key}`", self.arch),
            )
        })
    }
    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.g
            .meta(&format!("{}.{key}", self.arch))
            .and_then(MetaValue::as_f64)
            .map(|v| v as f32)
    }
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.g
            .meta(&format!("{}.{key}", self.arch))
            .and_then(MetaValue::as_str)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        if let Some(v) = self.opt_usize("vocab_size") {
            return Ok(v);
        }
        self.g
            .tensor("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| AvbError::corrupt(self.path, "GGUF has no `token_embd.weight`"))
    }

    /// The shared shape fields; `head_dim` from key_length or the RoPE dimension, else hidden / heads.
    pub fn shape(&self) -> Result<Shape> {
        let hidden_size = self.usize("embedding_length")?;
        let num_heads = self.usize("attention.head_count")?;
        Ok(Shape {
            vocab_size: self.vocab_size()?,
            hidden_size,
            intermediate_size: self.usize("feed_forward_length")?,
            num_layers: self.usize("block_count")?,
            num_heads,
            num_kv_heads: self
                .opt_usize("attention.head_count_kv")
                .unwrap_or(num_heads),
            head_dim: self
                .opt_usize("attention.key_length")
                .or_else(|| self.opt_usize("rope.dimension_count"))
                .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
        })
    }

    /// `ModelConfig::base` from this file's shape, RMS epsilon and context length.
    pub fn base(&self, family: Family, rope: Rope, default_context: usize) -> Result<ModelConfig> {
        Ok(ModelConfig::base(
            family,
            self.shape()?,
            self.rms_eps(),
            rope,
            self.opt_usize("context_length").unwrap_or(default_context),
        ))
    }

    /// `rope.freq_base` and `rope.scaling.*` (llama.cpp's keys); llama.cpp's per-frequency divisors come in
    /// the `rope_freqs.weight` tensor, read by the loader.
    pub fn rope(&self, default_theta: f32) -> Result<Rope> {
        let theta = self.opt_f32("rope.freq_base").unwrap_or(default_theta);
        let scaling = match self.opt_str("rope.scaling.type") {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self.opt_f32("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(AvbError::unsupported(
                    self.path,
                    format!("GGUF RoPE scaling `{other}` (avb supports none and linear; llama3 comes as rope_freqs)"),
                ))
            }
        };
        Ok(Rope { theta, scaling })
    }

    pub fn rms_eps(&self) -> f64 {
        self.opt_f32("attention.layer_norm_rms_epsilon")
            .map(f64::from)
            .unwrap_or(1e-6)
    }
}
