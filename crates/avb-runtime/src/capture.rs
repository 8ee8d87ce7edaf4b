//! Residual-stream capture at the output of block K over a corpus, batched, pooled per text: mean over the
//! text's tokens (optionally leaving out a leading BOS, whose activation is often huge) and the last token.

use crate::model::{to_vec, Input, Model};
use avb_core::{AvbError, Result};
use avb_model::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct CaptureOptions {
    pub layer: usize,
    /// Texts are truncated to this many tokens (BOS included).
    pub max_tokens: usize,
    pub batch_size: usize,
    /// Leave a leading BOS out of the mean.
    pub mean_skips_bos: bool,
}

/// Pooled activations, row-major [n, hidden].
pub struct Captured {
    pub mean: Vec<f32>,
    pub last: Vec<f32>,
    pub hidden: usize,
    /// Token count of each text after truncation.
    pub tokens: Vec<usize>,
}

pub fn capture(
    model: &Model,
    tokenizer: &Tokenizer,
    texts: &[String],
    opts: &CaptureOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Captured> {
    if opts.batch_size == 0 || opts.max_tokens == 0 {
        return Err(AvbError::Invalid(
            "batch size and max tokens must be positive".into(),
        ));
    }
    let d = model.config.hidden_size;
    // Similar lengths in one batch waste less on padding: batch in length order, write back in input order.
    let mut encoded = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let mut ids = tokenizer.encode(t, true)?;
        if ids.is_empty() {
            return Err(AvbError::Invalid(format!("text {i} has no tokens")));
        }
        ids.truncate(opts.max_tokens);
        encoded.push(ids);
    }
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| encoded[i].len());
    let mut mean = vec![0f32; texts.len() * d];
    let mut last = vec![0f32; texts.len() * d];
    let mut done = 0;
    for chunk in order.chunks(opts.batch_size) {
        let inputs: Vec<Input> = chunk
            .iter()
            .map(|&i| Input::ids(encoded[i].clone()))
            .collect();
        let h = to_vec(model.forward_to(&inputs, opts.layer, None)?)?;
        let t = h.len() / (chunk.len() * d);
        for (row, &i) in chunk.iter().enumerate() {
            let n = encoded[i].len();
            let pad = t - n;
            let skip =
                usize::from(opts.mean_skips_bos && n > 1 && tokenizer.bos == Some(encoded[i][0]));
            let positions = pad + skip..t;
            let count = positions.len() as f32;
            let dst = &mut mean[i * d..(i + 1) * d];
            for p in positions {
                let src = &h[(row * t + p) * d..(row * t + p + 1) * d];
                dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
            dst.iter_mut().for_each(|a| *a /= count);
            last[i * d..(i + 1) * d].copy_from_slice(&h[(row * t + t - 1) * d..(row * t + t) * d]);
        }
        done += chunk.len();
        progress(done);
    }
    Ok(Captured {
        mean,
        last,
        hidden: d,
        tokens: encoded.iter().map(Vec::len).collect(),
    })
}
