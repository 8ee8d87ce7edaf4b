//! The activation reconstructor (AR) of an NLA pair: explanation text -> vector. The backbone is the first K+1
//! blocks (no final norm, no LM head), read at the last token, then `value_head` (Linear d -> d, no bias).
//! Scores follow the protocol: both vectors normalised to `mse_scale`, MSE = 2(1 - cos), FVE against the MSE of
//! predicting the mean normalised gold vector.

use crate::sidecar::{NlaMeta, Role};
use avb_core::io::FileSource;
use avb_core::safetensors::{read_rows, Header};
use avb_core::{AvbError, Matrix, Result};
use avb_runtime::loader::{self, LoadedModel};
use avb_runtime::{Device, Input, Precision};
use burn::tensor::{Tensor, TensorData};
use std::path::Path;

pub struct Reconstructor {
    pub meta: NlaMeta,
    pub lm: LoadedModel,
    /// [in, out] (transposed from torch's [out, in]).
    value_head: Tensor<2>,
}

impl Reconstructor {
    /// An AR checkpoint directory: HF files, `nla_meta.yaml` (role: ar) and `value_head.safetensors`.
    pub fn open(dir: &Path, device: &Device, precision: Precision) -> Result<Reconstructor> {
        let side = dir.join("nla_meta.yaml");
        let meta = NlaMeta::read(&side)?;
        if meta.role != Role::Ar {
            return Err(AvbError::Invalid(format!(
                "{} describes a verbalizer (role: av); scoring needs the reconstructor (role: ar) of the pair",
                side.display()
            )));
        }
        let lm = loader::open(&dir.display().to_string(), device, precision)?;
        let d = meta.d_model;
        if lm.model.config.hidden_size != d {
            return Err(AvbError::dimension(
                side.display().to_string(),
                format!(
                    "d_model {d} but the model has hidden size {}",
                    lm.model.config.hidden_size
                ),
                "use the sidecar that belongs to this checkpoint",
            ));
        }
        if meta.extraction_layer_index >= lm.model.config.num_layers {
            return Err(AvbError::Invalid(format!(
                "{}: extraction_layer_index {} but the model has {} blocks",
                side.display(),
                meta.extraction_layer_index,
                lm.model.config.num_layers
            )));
        }
        let head_path = dir.join("value_head.safetensors");
        let src = FileSource::open(&head_path)?;
        let header = Header::read(&src)?;
        let name = ["weight", "value_head.weight"]
            .into_iter()
            .find(|n| header.tensors.contains_key(*n))
            .map(str::to_string)
            .or_else(|| {
                (header.tensors.len() == 1)
                    .then(|| header.tensors.keys().next().cloned())
                    .flatten()
            })
            .ok_or_else(|| AvbError::corrupt(&head_path, "no `weight` tensor"))?;
        let info = header.tensor(&src, &name)?.clone();
        if info.shape != [d, d] {
            return Err(AvbError::dimension(
                head_path.display().to_string(),
                format!("value head of shape {:?}, expected [{d}, {d}]", info.shape),
                "use the value_head.safetensors of this AR checkpoint",
            ));
        }
        let w = read_rows(&src, &info, 0, d)?;
        let value_head = Tensor::<2>::from_data(TensorData::new(w, [d, d]), device).transpose();
        Ok(Reconstructor {
            meta,
            lm,
            value_head,
        })
    }

    /// Token ids of the AR input for one explanation: raw template text with special tokens (BOS where the
    /// model wants it), no chat template.
    pub fn input_ids(&self, explanation: &str) -> Result<Vec<u32>> {
        let text = self
            .meta
            .ar_template()
            .replace("{explanation}", explanation);
        self.lm.tokenizer.encode(&text, true)
    }

    /// Predicted vectors, one row per explanation.
    pub fn predict(&self, explanations: &[String], batch_size: usize) -> Result<Matrix> {
        let d = self.meta.d_model;
        let mut out = Vec::with_capacity(explanations.len() * d);
        for chunk in explanations.chunks(batch_size.max(1)) {
            let inputs = chunk
                .iter()
                .map(|e| Ok(Input::ids(self.input_ids(e)?)))
                .collect::<Result<Vec<_>>>()?;
            let h = self
                .lm
                .model
                .forward_to(&inputs, self.meta.extraction_layer_index, None)?;
            let [b, t, _] = h.dims();
            // Rows are left-padded: every row's last token is at position t - 1.
            let last = h.narrow(1, t - 1, 1).reshape([b, d]);
            let pred = avb_runtime::matmul(last, self.value_head.clone());
            out.extend(pred.into_data().try_into_vec::<f32>().map_err(|e| {
                AvbError::Invalid(format!("reading predictions back failed: {e:?}"))
            })?);
        }
        Ok(Matrix::new(explanations.len(), d, out))
    }
}

/// Reconstruction scores of one prediction against its gold vector.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ArScore {
    pub cosine: f64,
    /// mean((p - g)^2) with both normalised to norm mse_scale = sqrt(d): 2 (1 - cos).
    pub nmse: f64,
    /// 1 - nmse / baseline, baseline = MSE of predicting the mean normalised gold vector of the set.
    pub fve: f64,
}

pub fn ar_scores(pred: &Matrix, gold: &Matrix, mse_scale: f64) -> Result<Vec<ArScore>> {
    if pred.rows != gold.rows || pred.cols != gold.cols || gold.rows == 0 {
        return Err(AvbError::Invalid(format!(
            "AR scoring needs equal, non-empty shapes (predictions {}x{}, gold {}x{})",
            pred.rows, pred.cols, gold.rows, gold.cols
        )));
    }
    let d = gold.cols;
    let scaled = |row: &[f32]| -> Result<Vec<f64>> {
        let n = row
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        if n == 0.0 || !n.is_finite() {
            return Err(AvbError::Invalid(
                "a zero or non-finite vector cannot be scored".into(),
            ));
        }
        Ok(row.iter().map(|x| f64::from(*x) * mse_scale / n).collect())
    };
    let p: Vec<Vec<f64>> = (0..pred.rows)
        .map(|i| scaled(pred.row(i)))
        .collect::<Result<_>>()?;
    let g: Vec<Vec<f64>> = (0..gold.rows)
        .map(|i| scaled(gold.row(i)))
        .collect::<Result<_>>()?;
    let mut mean = vec![0f64; d];
    for row in &g {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x / g.len() as f64;
        }
    }
    let mse = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / d as f64
    };
    let baseline = g.iter().map(|row| mse(&mean, row)).sum::<f64>() / g.len() as f64;
    Ok(p.iter()
        .zip(&g)
        .map(|(p, g)| {
            let nmse = mse(p, g);
            let cosine = p.iter().zip(g).map(|(x, y)| x * y).sum::<f64>() / (mse_scale * mse_scale);
            ArScore {
                cosine,
                nmse,
                fve: if baseline > 0.0 {
                    1.0 - nmse / baseline
                } else {
                    f64::NAN
                },
            }
        })
        .collect())
}
