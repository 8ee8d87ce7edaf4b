//! Qwen2 / Qwen2.5: pre-norm blocks, q/k/v biases, rotate-half RoPE, grouped-query attention, SwiGLU, RMSNorm,
//! tied or separate LM head (Qwen2.5-7B, the released AV's base, has a separate head).

use crate::config::{Family, GgufMeta, HfConfig, ModelConfig};
use avb_core::{AvbError, Result};

const DEFAULT_THETA: f32 = 10_000.0;
const DEFAULT_CONTEXT: usize = 32_768;

pub(crate) fn config_from_hf(c: &HfConfig) -> Result<ModelConfig> {
    if c.bool_or("use_sliding_window", false) {
        return Err(AvbError::unsupported(
            c.path,
            "Qwen2 with use_sliding_window = true (no released Qwen2.5 checkpoint uses it)",
        ));
    }
    let base = c.base(
        Family::Qwen2,
        c.rope(c.v.get("rope_parameters"), DEFAULT_THETA)?,
        DEFAULT_CONTEXT,
    )?;
    Ok(ModelConfig {
        qkv_bias: true,
        tie_embeddings: c.bool_or("tie_word_embeddings", false),
        ..base
    })
}

pub(crate) fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let base = m.base(Family::Qwen2, m.rope(DEFAULT_THETA)?, DEFAULT_CONTEXT)?;
    Ok(ModelConfig {
        qkv_bias: true,
        tie_embeddings: m.g.tensor("output.weight").is_none(),
        ..base
    })
}
