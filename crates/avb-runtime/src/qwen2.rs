//! Qwen2 / Qwen2.5: pre-norm blocks, q/k/v biases, rotate-half RoPE, grouped-query attention, SwiGLU, RMSNorm,
//! tied or separate LM head (Qwen2.5-7B, the released AV's base, has a separate head).

use crate::config::{Family, GgufMeta, HfConfig, ModelConfig};
use avb_core::{AvbError, Result};

pub(crate) fn config_from_hf(c: &HfConfig) -> Result<ModelConfig> {
    if c.bool_or("use_sliding_window", false) {
        return Err(AvbError::unsupported(
            c.path,
            "Qwen2 with use_sliding_window = true (no released Qwen2.5 checkpoint uses it)",
        ));
    }
    let (vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim) =
        c.shape()?;
    Ok(ModelConfig {
        family: Family::Qwen2,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_eps: c.f64_or("rms_norm_eps", 1e-6),
        qkv_bias: true,
        tie_embeddings: c.bool_or("tie_word_embeddings", false),
        rope: c.rope(c.v.get("rope_parameters"), 10_000.0)?,
        rope_local: None,
        windows: vec![None; num_layers],
        attn_scale: (head_dim as f32).powf(-0.5),
        attn_softcap: None,
        final_softcap: None,
        max_positions: c.opt_usize("max_position_embeddings").unwrap_or(32_768),
    })
}

pub(crate) fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let (vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim) =
        m.shape()?;
    Ok(ModelConfig {
        family: Family::Qwen2,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_eps: m.rms_eps(),
        qkv_bias: true,
        tie_embeddings: m.g.tensor("output.weight").is_none(),
        rope: m.rope(10_000.0)?,
        rope_local: None,
        windows: vec![None; num_layers],
        attn_scale: (head_dim as f32).powf(-0.5),
        attn_softcap: None,
        final_softcap: None,
        max_positions: m.opt_usize("context_length").unwrap_or(32_768),
    })
}
