//! Where the decoder's tensors come from: a GGUF file (llama.cpp names, dequantized to f32), a Hugging Face
//! checkpoint directory (safetensors, f32/f16/bf16) or an avbridge web bundle (a directory with manifest.json;
//! Hugging Face tensor names, quantized blocks). All are read through logical tensor ids, returned in the
//! Hugging Face convention (row-major [out, in], Llama Q/K in rotate-half order, Gemma norm weights as w).

use crate::config::{Family, ModelConfig};
use crate::llama;
use avb_core::io::{FileSource, RangeSource};
use avb_core::matrix::transpose;
use avb_core::{AvbError, Result};
use avb_model::bundle::{self, Bundle};
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
pub(crate) fn hf_name(family: Family, prefix: &str, id: TensorId) -> String {
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

/// What precedes `embed_tokens.weight` in a web bundle.
pub(crate) const BUNDLE_PREFIX: &str = "model.";

pub enum WeightSource {
    Gguf { gguf: Gguf, src: FileSource },
    Hf { ckpt: Checkpoint, prefix: String },
    Bundle(Box<Bundle>),
}

/// Every tensor the decoder reads, with its logical shape ([out, in] for linear weights). The LM head is listed
/// only for models that do not tie it to the embedding.
pub fn model_tensors(c: &ModelConfig, separate_head: bool) -> Vec<(TensorId, Vec<usize>)> {
    use LayerTensor::*;
    let (d, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q_out, kv_out) = (c.num_heads * hd, c.num_kv_heads * hd);
    let gemma = c.family == Family::Gemma3;
    let mut out = vec![(TensorId::Embed, vec![c.vocab_size, d])];
    for l in 0..c.num_layers {
        let mut layer = vec![
            (AttnNorm, vec![d]),
            (Q, vec![q_out, d]),
            (K, vec![kv_out, d]),
            (V, vec![kv_out, d]),
            (O, vec![d, q_out]),
            (PreFfnNorm, vec![d]),
            (Gate, vec![inter, d]),
            (Up, vec![inter, d]),
            (Down, vec![d, inter]),
        ];
        if c.qkv_bias {
            layer.extend([
                (QBias, vec![q_out]),
                (KBias, vec![kv_out]),
                (VBias, vec![kv_out]),
            ]);
        }
        if gemma {
            layer.extend([
                (QNorm, vec![hd]),
                (KNorm, vec![hd]),
                (PostAttnNorm, vec![d]),
                (PostFfnNorm, vec![d]),
            ]);
        }
        out.extend(layer.into_iter().map(|(t, s)| (TensorId::Layer(l, t), s)));
    }
    out.push((TensorId::FinalNorm, vec![d]));
    if separate_head {
        out.push((TensorId::Head, vec![c.vocab_size, d]));
    }
    out
}

impl WeightSource {
    /// A `.gguf` file or a Hugging Face checkpoint directory, with the configuration it implies.
    pub fn open(path: &Path) -> Result<(WeightSource, ModelConfig)> {
        if bundle::is_bundle_dir(path) {
            WeightSource::from_bundle(Bundle::open_dir(path)?)
        } else if path.is_dir() {
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

    /// A web bundle opened from a directory or from fetched files, with the configuration its manifest records.
    pub fn from_bundle(bundle: Bundle) -> Result<(WeightSource, ModelConfig)> {
        let config: ModelConfig =
            serde_json::from_value(bundle.manifest.config.clone()).map_err(|e| {
                AvbError::corrupt(
                    bundle.name(),
                    format!(
                        "the manifest's `config` is not a model configuration this avb reads ({e})"
                    ),
                )
            })?;
        if config.windows.len() != config.num_layers || config.num_heads == 0 {
            return Err(AvbError::corrupt(
                bundle.name(),
                "the manifest's `config` is inconsistent (one window entry per layer, at least one head)",
            ));
        }
        Ok((WeightSource::Bundle(Box::new(bundle)), config))
    }

    pub fn gguf(&self) -> Option<&Gguf> {
        match self {
            WeightSource::Gguf { gguf, .. } => Some(gguf),
            _ => None,
        }
    }

    pub fn bundle(&self) -> Option<&Bundle> {
        match self {
            WeightSource::Bundle(b) => Some(b),
            _ => None,
        }
    }

    pub fn has(&self, cfg: &ModelConfig, id: TensorId) -> bool {
        match self {
            WeightSource::Gguf { gguf, .. } => gguf.tensor(&gguf_name(id)).is_some(),
            WeightSource::Hf { ckpt, prefix } => {
                ckpt.info(&hf_name(cfg.family, prefix, id)).is_ok()
            }
            WeightSource::Bundle(b) => b.has(&hf_name(cfg.family, BUNDLE_PREFIX, id)),
        }
    }

    /// A logical [out, in] weight as [in, out]: the layout the runtime multiplies by, and the one bundles store.
    pub fn read_transposed(
        &self,
        cfg: &ModelConfig,
        id: TensorId,
        shape: [usize; 2],
    ) -> Result<Vec<f32>> {
        match self {
            WeightSource::Bundle(b) => {
                b.read_transposed(&hf_name(cfg.family, BUNDLE_PREFIX, id), shape)
            }
            _ => Ok(transpose(&self.read(cfg, id, &shape)?, shape[0], shape[1])),
        }
    }

    /// Tensor `id` as row-major f32 of `shape`, in the Hugging Face convention.
    pub fn read(&self, cfg: &ModelConfig, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            WeightSource::Hf { ckpt, prefix } => {
                ckpt.read_f32(&hf_name(cfg.family, prefix, id), shape)
            }
            WeightSource::Bundle(b) => b.read(&hf_name(cfg.family, BUNDLE_PREFIX, id), shape),
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
