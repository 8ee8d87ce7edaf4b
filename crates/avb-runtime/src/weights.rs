//! Where the decoder's tensors come from: a GGUF file (llama.cpp names, dequantized to f32) or a Hugging Face
//! checkpoint directory (safetensors, f32/f16/bf16). Both are read through logical tensor ids, returned in the
//! Hugging Face convention (row-major [out, in], Llama Q/K in rotate-half order, Gemma norm weights as w).

use crate::config::{Family, ModelConfig};
use crate::llama;
use avb_core::io::{FileSource, RangeSource};
use avb_core::{AvbError, Result};
use avb_model::checkpoint::Checkpoint;
use avb_model::gguf::Gguf;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    /// Gemma-3's norm after attention (Qwen2/Llama have none).
    PostAttnNorm,
    /// The norm in front of the MLP (`post_attention_layernorm` in Qwen2/Llama checkpoints).
    PreFfnNorm,
    PostFfnNorm,
    Gate,
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorId {
    Embed,
    Head,
    FinalNorm,
    Layer(usize, LayerTensor),
}

fn gguf_name(id: TensorId) -> String {
    use LayerTensor::*;
    let (layer, t) = match id {
        TensorId::Embed => return "token_embd.weight".into(),
        TensorId::Head => return "output.weight".into(),
        TensorId::FinalNorm => return "output_norm.weight".into(),
        TensorId::Layer(l, t) => (l, t),
    };
    let name = match t {
        AttnNorm => "attn_norm.weight",
        Q => "attn_q.weight",
        K => "attn_k.weight",
        V => "attn_v.weight",
        O => "attn_output.weight",
        QBias => "attn_q.bias",
        KBias => "attn_k.bias",
        VBias => "attn_v.bias",
        QNorm => "attn_q_norm.weight",
        KNorm => "attn_k_norm.weight",
        PostAttnNorm => "post_attention_norm.weight",
        PreFfnNorm => "ffn_norm.weight",
        PostFfnNorm => "post_ffw_norm.weight",
        Gate => "ffn_gate.weight",
        Up => "ffn_up.weight",
        Down => "ffn_down.weight",
    };
    format!("blk.{layer}.{name}")
}

/// `prefix` is what precedes `embed_tokens.weight` (`model.`, or `model.language_model.` in multimodal Gemma-3).
fn hf_name(family: Family, prefix: &str, id: TensorId) -> String {
    use LayerTensor::*;
    let (layer, t) = match id {
        TensorId::Embed => return format!("{prefix}embed_tokens.weight"),
        TensorId::Head => return "lm_head.weight".into(),
        TensorId::FinalNorm => return format!("{prefix}norm.weight"),
        TensorId::Layer(l, t) => (l, t),
    };
    let name = match (t, family) {
        (AttnNorm, _) => "input_layernorm.weight",
        (Q, _) => "self_attn.q_proj.weight",
        (K, _) => "self_attn.k_proj.weight",
        (V, _) => "self_attn.v_proj.weight",
        (O, _) => "self_attn.o_proj.weight",
        (QBias, _) => "self_attn.q_proj.bias",
        (KBias, _) => "self_attn.k_proj.bias",
        (VBias, _) => "self_attn.v_proj.bias",
        (QNorm, _) => "self_attn.q_norm.weight",
        (KNorm, _) => "self_attn.k_norm.weight",
        (PostAttnNorm, _) => "post_attention_layernorm.weight",
        (PreFfnNorm, Family::Gemma3) => "pre_feedforward_layernorm.weight",
        (PreFfnNorm, _) => "post_attention_layernorm.weight",
        (PostFfnNorm, _) => "post_feedforward_layernorm.weight",
        (Gate, _) => "mlp.gate_proj.weight",
        (Up, _) => "mlp.up_proj.weight",
        (Down, _) => "mlp.down_proj.weight",
    };
    format!("{prefix}layers.{layer}.{name}")
}

pub enum WeightSource {
    Gguf { gguf: Gguf, src: FileSource },
    Hf { ckpt: Checkpoint, prefix: String },
}

impl WeightSource {
    /// A `.gguf` file or a Hugging Face checkpoint directory, with the configuration it implies.
    pub fn open(path: &Path) -> Result<(WeightSource, ModelConfig)> {
        if path.is_dir() {
            let ckpt = Checkpoint::open(path)?;
            let cfg = ModelConfig::from_hf(&ckpt.config, &path.join("config.json"))?;
            let prefix = ckpt
                .tensor_names()
                .find_map(|n| n.strip_suffix("embed_tokens.weight"))
                .map(str::to_string)
                .ok_or_else(|| {
                    AvbError::corrupt(
                        path,
                        "the checkpoint has no `*embed_tokens.weight` tensor (not a decoder LM?)",
                    )
                })?;
            Ok((WeightSource::Hf { ckpt, prefix }, cfg))
        } else {
            let src = FileSource::open(path)?;
            let gguf = Gguf::read(&src)?;
            let cfg = ModelConfig::from_gguf(&gguf, &src)?;
            Ok((WeightSource::Gguf { gguf, src }, cfg))
        }
    }

    pub fn gguf(&self) -> Option<&Gguf> {
        match self {
            WeightSource::Gguf { gguf, .. } => Some(gguf),
            WeightSource::Hf { .. } => None,
        }
    }

    pub fn has(&self, cfg: &ModelConfig, id: TensorId) -> bool {
        match self {
            WeightSource::Gguf { gguf, .. } => gguf.tensor(&gguf_name(id)).is_some(),
            WeightSource::Hf { ckpt, prefix } => {
                ckpt.info(&hf_name(cfg.family, prefix, id)).is_ok()
            }
        }
    }

    /// Tensor `id` as row-major f32 of `shape`, in the Hugging Face convention.
    pub fn read(&self, cfg: &ModelConfig, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            WeightSource::Hf { ckpt, prefix } => {
                ckpt.read_f32(&hf_name(cfg.family, prefix, id), shape)
            }
            WeightSource::Gguf { gguf, src } => {
                let name = gguf_name(id);
                let t = gguf.tensor(&name).ok_or_else(|| {
                    AvbError::corrupt(
                        src.name(),
                        format!("GGUF tensor `{name}` is missing (truncated conversion or another architecture?)"),
                    )
                })?;
                // A 1-D tensor's GGUF shape is [n]; 2-D is [rows, cols] after reversing ggml's order.
                if t.shape() != shape {
                    return Err(AvbError::dimension(
                        format!("{} tensor `{name}`", src.name().display()),
                        format!("shape {:?} but the metadata implies {shape:?}", t.shape()),
                        "check that the GGUF file is complete and of a supported architecture",
                    ));
                }
                let data = gguf.read_f32(src, &name)?;
                Ok(self.gguf_to_hf(cfg, id, data))
            }
        }
    }

    fn gguf_to_hf(&self, cfg: &ModelConfig, id: TensorId, data: Vec<f32>) -> Vec<f32> {
        use LayerTensor::*;
        match (cfg.family, id) {
            (Family::Llama, TensorId::Layer(_, t @ (Q | QBias))) => {
                let cols = if t == Q { cfg.hidden_size } else { 1 };
                llama::unpermute_qk(&data, cfg.num_heads, cols)
            }
            (Family::Llama, TensorId::Layer(_, t @ (K | KBias))) => {
                let cols = if t == K { cfg.hidden_size } else { 1 };
                llama::unpermute_qk(&data, cfg.num_kv_heads, cols)
            }
            // llama.cpp stores Gemma norm weights as 1 + w; transformers subtracts 1 in f32, and so do we.
            (Family::Gemma3, TensorId::FinalNorm)
            | (
                Family::Gemma3,
                TensorId::Layer(
                    _,
                    AttnNorm | QNorm | KNorm | PostAttnNorm | PreFfnNorm | PostFfnNorm,
                ),
            ) => data.into_iter().map(|w| w - 1.0).collect(),
            _ => data,
        }
    }
}
