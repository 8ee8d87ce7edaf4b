//! Llama (Llama-3.x, SmolLM2): pre-norm blocks without biases, grouped-query attention, SwiGLU, RMSNorm,
//! Llama-3 RoPE scaling. llama.cpp's GGUF converter permutes the Q and K rows into its interleaved RoPE layout;
//! `unpermute_qk` restores the rotate-half layout of the Hugging Face weights, so one RoPE serves every family.

use crate::config::{Family, GgufMeta, HfConfig, ModelConfig, RopeScaling};
use avb_core::Result;

const DEFAULT_THETA: f32 = 10_000.0;
const DEFAULT_CONTEXT: usize = 8192;

pub(crate) fn config_from_hf(c: &HfConfig) -> Result<ModelConfig> {
    let base = c.base(
        Family::Llama,
        c.rope(c.v.get("rope_parameters"), DEFAULT_THETA)?,
        DEFAULT_CONTEXT,
    )?;
    Ok(ModelConfig {
        qkv_bias: c.bool_or("attention_bias", false),
        tie_embeddings: c.bool_or("tie_word_embeddings", false),
        ..base
    })
}

/// `rope_divisors` is llama.cpp's `rope_freqs.weight` when the file has one (Llama-3.1+ scaling).
pub(crate) fn config_from_gguf(
    m: &GgufMeta,
    rope_divisors: Option<Vec<f32>>,
) -> Result<ModelConfig> {
    let mut rope = m.rope(DEFAULT_THETA)?;
    if let Some(d) = rope_divisors {
        rope.scaling = RopeScaling::Divisors(d);
    }
    let base = m.base(Family::Llama, rope, DEFAULT_CONTEXT)?;
    Ok(ModelConfig {
        qkv_bias: m.g.tensor("blk.0.attn_q.bias").is_some(),
        tie_embeddings: m.g.tensor("output.weight").is_none(),
        ..base
    })
}

/// Undo llama.cpp's Q/K permutation: within each head, rows were reordered from [half0, half1] (rotate-half) to
/// interleaved pairs. `rows` is row-major [heads * head_dim, cols] (a bias is the cols = 1 case).
pub(crate) fn unpermute_qk(rows: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; rows.len()];
    for h in 0..heads {
        for i in 0..half {
            for pair in 0..2 {
                // GGUF row (h, i, pair) holds HF row (h, pair, i).
                let src = (h * head_dim + 2 * i + pair) * cols;
                let dst = (h * head_dim + pair * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&rows[src..src + cols]);
            }
        }
    }
    out
}
