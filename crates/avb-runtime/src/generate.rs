//! Batched generation with a KV cache: sequences of different lengths (left-padded), greedy or
//! temperature + top-p sampling with a seed, stop tokens, a token budget, and a per-token callback that streams
//! and can stop a row (stop strings are checked there, on decoded text).

use crate::model::{Input, KvCache, Model};
use avb_core::rng::SplitMix64;
use avb_core::{AvbError, Result};
use burn::tensor::{Int, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// Argmax at every step (reproducible; the first index wins a tie, as in torch).
    Greedy,
    /// Softmax(logits / temperature), keep the smallest set of tokens whose probability reaches `top_p`,
    /// draw from it. Row r draws from its own generator seeded with `seed` and r.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end a sequence (EOS, end of turn); the stop token is kept in the output.
    pub stop_ids: Vec<u32>,
    /// Per-row sampling seeds (one per input) in place of `seed` and the row index: a row's draws then do not
    /// depend on the batch it lands in.
    pub row_seeds: Option<Vec<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    StopToken,
    Length,
    /// The callback stopped the row (a stop string, or cancellation).
    Callback,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub finish: Finish,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Generate for every input at once. `on_token(row, id)` sees each new token as soon as it is chosen.
pub fn generate(
    model: &Model,
    inputs: &[Input],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> Control,
) -> Result<Vec<Generation>> {
    if let Sampling::TopP {
        temperature, top_p, ..
    } = opts.sampling
    {
        if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(AvbError::Invalid(format!(
                "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p}); use greedy for temperature 0"
            )));
        }
    }
    let b = inputs.len();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            ids: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    if let Some(seeds) = &opts.row_seeds {
        if seeds.len() != b {
            return Err(AvbError::Invalid(format!(
                "{} row seeds for {b} inputs",
                seeds.len()
            )));
        }
    }
    let mut rngs: Vec<SplitMix64> = (0..b)
        .map(|r| match (&opts.row_seeds, &opts.sampling) {
            (Some(seeds), _) => SplitMix64::new(seeds[r]),
            (None, Sampling::TopP { seed, .. }) => {
                SplitMix64::new(seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
            }
            (None, Sampling::Greedy) => SplitMix64::new(0),
        })
        .collect();
    let mut active = vec![true; b];
    let mut cache: KvCache = model.new_cache(Vec::new());
    let last = model.config.num_layers - 1;
    let mut h = model.forward_to(inputs, last, Some(&mut cache))?;
    for step in 0..opts.max_new_tokens {
        let t = h.dims()[1];
        let logits = model.head(h.narrow(1, t - 1, 1)).squeeze_dim::<2>(1);
        let next = choose(logits, &opts.sampling, &mut rngs)?;
        let mut feed = Vec::with_capacity(b);
        for (row, &id) in next.iter().enumerate() {
            if active[row] {
                out[row].ids.push(id);
                if opts.stop_ids.contains(&id) {
                    out[row].finish = Finish::StopToken;
                    active[row] = false;
                }
                if on_token(row, id) == Control::Stop && active[row] {
                    out[row].finish = Finish::Callback;
                    active[row] = false;
                }
            }
            feed.push(Input::ids(vec![id]));
        }
        if !active.iter().any(|a| *a) || step + 1 == opts.max_new_tokens {
            break;
        }
        h = model.forward_to(&feed, last, Some(&mut cache))?;
    }
    Ok(out)
}

fn choose(logits: Tensor<2>, sampling: &Sampling, rngs: &mut [SplitMix64]) -> Result<Vec<u32>> {
    let read_err = |e| AvbError::Invalid(format!("reading logits back failed: {e:?}"));
    match sampling {
        Sampling::Greedy => {
            let ids: Tensor<2, Int> = logits.argmax(1);
            let ids = ids
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(read_err)?;
            Ok(ids.into_iter().map(|i| i as u32).collect())
        }
        Sampling::TopP {
            temperature, top_p, ..
        } => {
            let v = logits.dims()[1];
            let host = logits.into_data().try_into_vec::<f32>().map_err(read_err)?;
            Ok(host
                .chunks(v)
                .zip(rngs.iter_mut())
                .map(|(row, rng)| sample_top_p(row, *temperature, *top_p, rng))
                .collect())
        }
    }
}

/// Temperature, then nucleus (top-p) filtering as transformers' TopPLogitsWarper does it (tokens whose
/// cumulative probability from the least likely end is <= 1 - top_p are dropped; the top token always stays).
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> u32 {
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from(l) / f64::from(temperature))
        .collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> = scaled
        .iter()
        .enumerate()
        .map(|(i, &s)| (i, (s - max).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    // Ascending, ties by index, like a stable sort of the logits.
    probs.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut cumulative = 0.0;
    let cut = 1.0 - f64::from(top_p);
    let n = probs.len();
    let kept: Vec<(usize, f64)> = probs
        .into_iter()
        .enumerate()
        .filter_map(|(rank, p)| {
            cumulative += p.1;
            (cumulative > cut || rank + 1 == n).then_some(p)
        })
        .collect();
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.unit_f64() * mass;
    for (id, p) in kept.iter().rev() {
        if u < *p {
            return *id as u32;
        }
        u -= p;
    }
    kept.last().map_or(0, |p| p.0 as u32)
}
