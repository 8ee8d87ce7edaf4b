//! Gemma-3 text: embeddings scaled by sqrt(hidden) (injected rows are not), RMSNorm with (1 + w), q/k norms,
//! norms before and after both attention and MLP, GeGLU with tanh GELU, sliding-window (local) and global layers
//! with their own RoPE bases, 1/sqrt(query_pre_attn_scalar) attention scale, tied head.

use crate::config::{Family, GgufMeta, HfConfig, ModelConfig, Rope, RopeScaling};
use avb_core::{AvbError, Result};
use serde_json::Value;

const DEFAULT_PATTERN: usize = 6;
const DEFAULT_GLOBAL_THETA: f32 = 1_000_000.0;
const DEFAULT_LOCAL_THETA: f32 = 10_000.0;
const DEFAULT_CONTEXT: usize = 131_072;

/// Every `pattern`-th layer is global, the rest slide (transformers' default when `layer_types` is absent).
fn windows_from_pattern(num_layers: usize, pattern: usize, window: usize) -> Vec<Option<usize>> {
    (0..num_layers)
        .map(|i| ((i + 1) % pattern != 0).then_some(window))
        .collect()
}

pub(crate) fn config_from_hf(c: &HfConfig) -> Result<ModelConfig> {
    // transformers 5 nests rope_parameters by layer type; older configs have rope_theta (+ rope_scaling, global
    // layers only) and rope_local_base_freq.
    let params = c.v.get("rope_parameters").filter(|p| !p.is_null());
    let (rope, rope_local) = match params {
        Some(p) if p.get("full_attention").is_some() => (
            c.rope(p.get("full_attention"), DEFAULT_GLOBAL_THETA)?,
            c.rope(p.get("sliding_attention"), DEFAULT_LOCAL_THETA)?,
        ),
        _ => (
            c.rope(params, DEFAULT_GLOBAL_THETA)?,
            Rope {
                theta: c
                    .opt_f32("rope_local_base_freq")
                    .unwrap_or(DEFAULT_LOCAL_THETA),
                scaling: RopeScaling::None,
            },
        ),
    };
    let base = c.base(Family::Gemma3, rope, DEFAULT_CONTEXT)?;
    let window = c.opt_usize("sliding_window").unwrap_or(4096);
    let windows = match c.v.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(Some(window)),
                Some("full_attention") => Ok(None),
                other => Err(AvbError::corrupt(
                    c.path,
                    format!("unknown Gemma-3 layer type {other:?} in `layer_types`"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        None => windows_from_pattern(
            base.num_layers,
            c.opt_usize("sliding_window_pattern")
                .unwrap_or(DEFAULT_PATTERN),
            window,
        ),
    };
    let scalar = c.f64_or("query_pre_attn_scalar", 256.0) as f32;
    Ok(ModelConfig {
        qkv_bias: c.bool_or("attention_bias", false),
        tie_embeddings: c.bool_or("tie_word_embeddings", true),
        rope_local: Some(rope_local),
        windows,
        attn_scale: scalar.powf(-0.5),
        attn_softcap: c.opt_f32("attn_logit_softcapping"),
        final_softcap: c.opt_f32("final_logit_softcapping"),
        ..base
    })
}

pub(crate) fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let base = m.base(
        Family::Gemma3,
        m.rope(DEFAULT_GLOBAL_THETA)?,
        DEFAULT_CONTEXT,
    )?;
    let window = m.opt_usize("attention.sliding_window").unwrap_or(4096);
    // llama.cpp's rule for the attention scale: Gemma-3 27B (62 layers) uses hidden / heads (= its
    // query_pre_attn_scalar, 168); the other sizes use head_dim (their query_pre_attn_scalar = head_dim).
    let scalar = if base.num_layers == 62 {
        (base.hidden_size / base.num_heads) as f32
    } else {
        base.head_dim as f32
    };
    Ok(ModelConfig {
        tie_embeddings: m.g.tensor("output.weight").is_none(),
        rope_local: Some(Rope {
            theta: m
                .opt_f32("rope.freq_base_swa")
                .unwrap_or(DEFAULT_LOCAL_THETA),
            scaling: RopeScaling::None,
        }),
        windows: windows_from_pattern(base.num_layers, DEFAULT_PATTERN, window),
        attn_scale: scalar.powf(-0.5),
        attn_softcap: m.opt_f32("attn_logit_softcapping"),
        final_softcap: m.opt_f32("final_logit_softcapping"),
        ..base
    })
}
