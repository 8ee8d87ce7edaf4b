//! BERT sentence embedder (sentence-transformers all-MiniLM-L6-v2 and its kin) on the same burn runtime:
//! post-LayerNorm encoder, erf GELU, mean pooling over real tokens, L2 normalisation. This is the embedder the
//! lift metric uses; texts are truncated to `max_seq_length` of `sentence_bert_config.json` as
//! sentence-transformers does (the tokenizer.json's own 128-token truncation is overridden, as there).

use avb_core::{AvbError, Matrix, Result};
use avb_model::checkpoint::Checkpoint;
use avb_model::tokenizer::Tokenizer;
use burn::tensor::{activation, module, Bool, Device, Int, Tensor, TensorData};
use std::path::Path;

struct Dense {
    /// [in, out]
    weight: Tensor<2>,
    bias: Tensor<1>,
}

impl Dense {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        crate::kernels::linear(x, self.weight.clone(), Some(self.bias.clone()))
    }
}

struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<3>, eps: f32) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(2);
        centered * (var + eps).sqrt().recip() * self.weight.clone().unsqueeze::<3>()
            + self.bias.clone().unsqueeze::<3>()
    }
}

struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

pub struct SentenceEmbedder {
    device: Device,
    pub tokenizer: Tokenizer,
    word: Tensor<2>,
    position: Tensor<2>,
    token_type0: Tensor<1>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    eps: f32,
    pub max_seq_length: usize,
    pub hidden: usize,
}

impl SentenceEmbedder {
    /// A sentence-transformers directory: config.json (BERT), model.safetensors, tokenizer.json and
    /// sentence_bert_config.json. Only mean pooling + Normalize is supported (what the lift metric uses).
    pub fn load(dir: &Path, device: &Device) -> Result<SentenceEmbedder> {
        let ckpt = Checkpoint::open(dir)?;
        let model_type = ckpt.config.get("model_type").and_then(|v| v.as_str());
        if model_type != Some("bert") {
            return Err(AvbError::unsupported(
                dir,
                format!("model_type {model_type:?}: the sentence embedder runs BERT encoders (all-MiniLM-L6-v2)"),
            ));
        }
        let act = ckpt.config.get("hidden_act").and_then(|v| v.as_str());
        if act != Some("gelu") {
            return Err(AvbError::unsupported(
                dir,
                format!("hidden_act {act:?}: only BERT's erf GELU is implemented"),
            ));
        }
        let pooling_path = dir.join("1_Pooling/config.json");
        if pooling_path.exists() {
            let text = std::fs::read_to_string(&pooling_path)
                .map_err(|e| AvbError::io(&pooling_path, e))?;
            let pooling: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| AvbError::corrupt(&pooling_path, format!("not JSON ({e})")))?;
            if pooling.get("pooling_mode_mean_tokens") != Some(&serde_json::Value::Bool(true)) {
                return Err(AvbError::unsupported(
                    &pooling_path,
                    "only mean pooling is implemented (all-MiniLM-L6-v2's pooling)",
                ));
            }
        }
        let d = ckpt.config_usize("hidden_size")?;
        let n_layers = ckpt.config_usize("num_hidden_layers")?;
        let heads = ckpt.config_usize("num_attention_heads")?;
        let ff = ckpt.config_usize("intermediate_size")?;
        let vocab = ckpt.config_usize("vocab_size")?;
        let max_pos = ckpt.config_usize("max_position_embeddings")?;
        let types = ckpt.config_usize("type_vocab_size")?;
        let eps = ckpt
            .config
            .get("layer_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-12) as f32;
        if heads == 0 || d % heads != 0 {
            return Err(AvbError::corrupt(
                &dir.join("config.json"),
                format!("hidden_size {d} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        // Checkpoints saved from BertModel have bare names; from BertFor* they carry `bert.`.
        let prefix = if ckpt.tensor_names().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let read = |name: &str, shape: &[usize]| ckpt.read_f32(&format!("{prefix}{name}"), shape);
        let tensor2 = |name: &str, rows: usize, cols: usize| -> Result<Tensor<2>> {
            Ok(Tensor::from_data(
                TensorData::new(read(name, &[rows, cols])?, [rows, cols]),
                device,
            ))
        };
        let tensor1 = |name: &str, n: usize| -> Result<Tensor<1>> {
            Ok(Tensor::from_data(
                TensorData::new(read(name, &[n])?, [n]),
                device,
            ))
        };
        // torch Linear stores [out, in]; the product takes [in, out].
        let dense = |name: &str, out: usize, inp: usize| -> Result<Dense> {
            Ok(Dense {
                weight: tensor2(&format!("{name}.weight"), out, inp)?.transpose(),
                bias: tensor1(&format!("{name}.bias"), out)?,
            })
        };
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: tensor1(&format!("{name}.weight"), d)?,
                bias: tensor1(&format!("{name}.bias"), d)?,
            })
        };
        let layers = (0..n_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: dense(&format!("{p}.attention.self.query"), d, d)?,
                    key: dense(&format!("{p}.attention.self.key"), d, d)?,
                    value: dense(&format!("{p}.attention.self.value"), d, d)?,
                    attn_out: dense(&format!("{p}.attention.output.dense"), d, d)?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: dense(&format!("{p}.intermediate.dense"), ff, d)?,
                    output: dense(&format!("{p}.output.dense"), d, ff)?,
                    out_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_type0 = tensor2("embeddings.token_type_embeddings.weight", types, d)?
            .slice([0..1, 0..d])
            .reshape([d]);
        let max_seq_length = read_max_seq_length(dir)?.unwrap_or(max_pos).min(max_pos);
        let mut tokenizer = Tokenizer::from_hf_dir(dir)?;
        tokenizer.set_max_length(max_seq_length)?;
        Ok(SentenceEmbedder {
            device: device.clone(),
            tokenizer,
            word: tensor2("embeddings.word_embeddings.weight", vocab, d)?,
            position: tensor2("embeddings.position_embeddings.weight", max_pos, d)?,
            token_type0,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            heads,
            eps,
            max_seq_length,
            hidden: d,
        })
    }

    /// Unit-norm embeddings, one row per text, in input order. Texts are batched in length order.
    pub fn embed(
        &self,
        texts: &[String],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Matrix> {
        let batch_size = batch_size.max(1);
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, true))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let d = self.hidden;
        let mut out = Matrix::zeros(texts.len(), d);
        for chunk in order.chunks(batch_size) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let pooled = self.forward(&rows)?;
            for (k, &i) in chunk.iter().enumerate() {
                let v = &pooled[k * d..(k + 1) * d];
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                for (o, x) in out.data[i * d..(i + 1) * d].iter_mut().zip(v) {
                    *o = x / norm;
                }
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Mean-pooled last hidden states of right-padded rows, [rows * hidden] on the host.
    fn forward(&self, rows: &[&[u32]]) -> Result<Vec<f32>> {
        let (b, d, h) = (rows.len(), self.hidden, self.heads);
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(AvbError::Invalid(
                "an empty text reached the embedder".into(),
            ));
        }
        let vocab = self.word.dims()[0];
        let mut flat = Vec::with_capacity(b * t);
        let mut keep = Vec::with_capacity(b * t);
        for r in rows {
            for j in 0..t {
                let id = r.get(j).copied().unwrap_or(0) as usize;
                if id >= vocab {
                    return Err(AvbError::Invalid(format!(
                        "token id {id} is outside the embedder's vocabulary of {vocab}"
                    )));
                }
                flat.push(id as i64);
                keep.push(if j < r.len() { 1f32 } else { 0f32 });
            }
        }
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(flat, [b, t]), &self.device);
        let positions = self.position.clone().slice([0..t, 0..d]).unsqueeze::<3>();
        let mut x = module::embedding(self.word.clone(), ids)
            + positions
            + self.token_type0.clone().unsqueeze::<3>();
        x = self.embed_norm.forward(x, self.eps);
        let keep: Tensor<2> = Tensor::from_data(TensorData::new(keep, [b, t]), &self.device);
        let pad_keys: Tensor<4, Bool> = keep
            .clone()
            .equal_elem(0.0)
            .reshape([b, 1, 1, t])
            .expand([b, h, t, t]);
        let hd = d / h;
        let scale = (hd as f32).sqrt().recip();
        for layer in &self.layers {
            let split = |y: Tensor<3>| y.reshape([b, t, h, hd]).swap_dims(1, 2);
            let q = split(layer.query.forward(x.clone()));
            let k = split(layer.key.forward(x.clone()));
            let v = split(layer.value.forward(x.clone()));
            let scores = crate::kernels::matmul(q, k.swap_dims(2, 3)) * scale;
            let probs =
                activation::softmax(scores.mask_fill(pad_keys.clone(), f32::NEG_INFINITY), 3);
            let ctx = crate::kernels::matmul(probs, v)
                .swap_dims(1, 2)
                .reshape([b, t, d]);
            x = layer
                .attn_norm
                .forward(layer.attn_out.forward(ctx) + x, self.eps);
            let inter = activation::gelu(layer.intermediate.forward(x.clone()));
            x = layer
                .out_norm
                .forward(layer.output.forward(inter) + x, self.eps);
        }
        let weights = keep.unsqueeze_dim::<3>(2);
        let summed = (x * weights.clone()).sum_dim(1).reshape([b, d]);
        let counts = weights.sum_dim(1).reshape([b, 1]);
        (summed / counts)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| AvbError::Invalid(format!("reading embeddings back failed: {e:?}")))
    }
}

fn read_max_seq_length(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("sentence_bert_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| AvbError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| AvbError::corrupt(&path, format!("not JSON ({e})")))?;
    Ok(v.get("max_seq_length")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize))
}
