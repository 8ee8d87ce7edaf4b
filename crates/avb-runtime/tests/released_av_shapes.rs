//! The released AVs' base models are these three families: their Hugging Face configs (the legacy keys they ship
//! with: rope_theta + rope_scaling, rope_local_base_freq, sliding_window_pattern, a multimodal text_config) parse into
//! the shapes, attention layouts and RoPE the runtime needs. Weights of these sizes are exercised on the GPU
//! machine, not here.

use avb_runtime::config::{Family, ModelConfig, RopeScaling};
use serde_json::json;
use std::path::Path;

fn parse(v: serde_json::Value) -> ModelConfig {
    ModelConfig::from_hf(&v, Path::new("config.json")).unwrap()
}

/// Parameters implied by the shapes (embedding + head when untied + blocks + final norm).
fn parameters(c: &ModelConfig) -> u64 {
    let (d, f, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    let attn = d * q + 2 * d * kv + q * d + if c.qkv_bias { q + 2 * kv } else { 0 };
    let norms = match c.family {
        Family::Gemma3 => 4 * d + 2 * c.head_dim as u64,
        _ => 2 * d,
    };
    let block = attn + 3 * d * f + norms;
    v * d * if c.tie_embeddings { 1 } else { 2 } + c.num_layers as u64 * block + d
}

#[test]
fn qwen2_5_7b() {
    let c = parse(json!({
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "max_position_embeddings": 32768,
        "use_sliding_window": false, "sliding_window": 131072
    }));
    assert_eq!(
        (c.family, c.head_dim, c.qkv_bias, c.tie_embeddings),
        (Family::Qwen2, 128, true, false)
    );
    assert_eq!(c.rope.theta, 1e6);
    assert!(c.windows.iter().all(Option::is_none));
    let p = parameters(&c);
    assert!((7_500_000_000..7_700_000_000).contains(&p), "{p}");
}

#[test]
fn gemma3_12b_multimodal_config() {
    let c = parse(json!({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "sliding_window": 1024, "sliding_window_pattern": 6,
            "vocab_size": 262208, "rms_norm_eps": 1e-6
        }
    }));
    assert_eq!(c.family, Family::Gemma3);
    assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.rope_local.as_ref().unwrap().theta, 10000.0);
    assert_eq!(c.rope_local.as_ref().unwrap().scaling, RopeScaling::None);
    // Layers 5, 11, ... are global; the rest slide over 1024 positions.
    assert_eq!(c.windows[4], Some(1024));
    assert_eq!(c.windows[5], None);
    assert_eq!(c.windows.iter().filter(|w| w.is_none()).count(), 8);
    assert_eq!(c.attn_scale, 256f32.powf(-0.5));
    assert!(c.tie_embeddings);
    let p = parameters(&c);
    assert!((11_500_000_000..12_000_000_000).contains(&p), "{p}");
}

#[test]
fn gemma3_27b_query_scale_differs_from_head_dim() {
    let c = parse(json!({
        "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024, "vocab_size": 262208
    }));
    assert_eq!(c.attn_scale, 168f32.powf(-0.5));
    assert_eq!(c.head_dim, 128);
    let p = parameters(&c);
    assert!((26_500_000_000..27_500_000_000).contains(&p), "{p}");
}

#[test]
fn llama_3_3_70b() {
    let c = parse(json!({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "max_position_embeddings": 131072
    }));
    assert_eq!(
        (c.family, c.head_dim, c.num_kv_heads),
        (Family::Llama, 128, 8)
    );
    assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { .. }));
    // High frequencies are kept, the lowest are divided by the factor.
    let base = avb_runtime::config::Rope {
        theta: 500000.0,
        scaling: RopeScaling::None,
    }
    .inv_freq(128);
    let scaled = c.rope.inv_freq(128);
    assert_eq!(scaled[0], base[0]);
    assert!((scaled[63] - base[63] / 8.0).abs() <= f32::EPSILON * base[63]);
    let p = parameters(&c);
    assert!((70_000_000_000..71_000_000_000).contains(&p), "{p}");
}
