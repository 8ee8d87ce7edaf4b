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

/// What a decoding step needs from the device: the chosen ids (greedy: argmax on the device, one small read) or
/// the last logits (sampling on the host).
pub enum Readback {
    Ids(Tensor<2, Int>),
    Logits(Tensor<2>),
}

/// The values of a `Readback` once on the host.
pub enum HostValues {
    Ids(Vec<i64>),
    Logits(Vec<f32>),
}

fn read_err(e: impl std::fmt::Debug) -> AvbError {
    AvbError::Invalid(format!("reading logits back failed: {e:?}"))
}

impl Readback {
    /// Blocking read (native backends).
    pub fn read(self) -> Result<HostValues> {
        Ok(match self {
            Readback::Ids(t) => HostValues::Ids(
                t.into_data()
                    .convert::<i64>()
                    .try_into_vec()
                    .map_err(read_err)?,
            ),
            Readback::Logits(t) => {
                HostValues::Logits(t.into_data().try_into_vec().map_err(read_err)?)
            }
        })
    }

    /// Asynchronous read: the only kind a browser allows.
    pub async fn read_async(self) -> Result<HostValues> {
        Ok(match self {
            Readback::Ids(t) => HostValues::Ids(
                t.into_data_async()
                    .await
                    .map_err(read_err)?
                    .convert::<i64>()
                    .try_into_vec()
                    .map_err(read_err)?,
            ),
            Readback::Logits(t) => HostValues::Logits(
                t.into_data_async()
                    .await
                    .map_err(read_err)?
                    .try_into_vec()
                    .map_err(read_err)?,
            ),
        })
    }
}

/// Batched decoding as a state machine, so that one implementation serves the blocking driver (`generate`) and
/// the asynchronous one (`generate_async`, the browser's): `readback` gives the device values the next choice
/// needs, `advance` consumes them, feeds the chosen tokens and says whether to go on.
pub struct Decoder<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    rngs: Vec<SplitMix64>,
    active: Vec<bool>,
    cache: KvCache,
    out: Vec<Generation>,
    /// Hidden states of the last forward pass; None once decoding is over.
    hidden: Option<Tensor<3>>,
    step: usize,
}

impl<'m> Decoder<'m> {
    /// Check the options and run the prompt (prefill).
    pub fn new(model: &'m Model, inputs: &[Input], opts: &GenerateOptions) -> Result<Decoder<'m>> {
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
        if let Some(seeds) = &opts.row_seeds {
            if seeds.len() != b {
                return Err(AvbError::Invalid(format!(
                    "{} row seeds for {b} inputs",
                    seeds.len()
                )));
            }
        }
        let rngs = (0..b)
            .map(|r| match (&opts.row_seeds, &opts.sampling) {
                (Some(seeds), _) => SplitMix64::new(seeds[r]),
                (None, Sampling::TopP { seed, .. }) => {
                    SplitMix64::new(seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
                }
                (None, Sampling::Greedy) => SplitMix64::new(0),
            })
            .collect();
        let prompt = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let mut cache = model.new_cache(prompt + opts.max_new_tokens);
        let hidden = if opts.max_new_tokens == 0 {
            None
        } else {
            Some(model.forward_to(inputs, model.config.num_layers - 1, Some(&mut cache))?)
        };
        Ok(Decoder {
            model,
            opts: opts.clone(),
            rngs,
            active: vec![true; b],
            cache,
            out: (0..b)
                .map(|_| Generation {
                    ids: Vec::new(),
                    finish: Finish::Length,
                })
                .collect(),
            hidden,
            step: 0,
        })
    }

    /// What to read from the device for the next tokens; None when decoding is over.
    pub fn readback(&self) -> Option<Readback> {
        let h = self.hidden.as_ref()?;
        let t = h.dims()[1];
        let logits = self
            .model
            .head(h.clone().narrow(1, t - 1, 1))
            .squeeze_dim::<2>(1);
        Some(match self.opts.sampling {
            Sampling::Greedy => Readback::Ids(logits.argmax(1)),
            Sampling::TopP { .. } => Readback::Logits(logits),
        })
    }

    /// Choose the next token of every row from `host`, report it through `on_token(row, id)`, and run the next
    /// step unless every row is done or the budget is spent.
    pub fn advance(
        &mut self,
        host: HostValues,
        on_token: &mut dyn FnMut(usize, u32) -> Control,
    ) -> Result<()> {
        let next: Vec<u32> = match (host, &self.opts.sampling) {
            (HostValues::Ids(ids), _) => ids.into_iter().map(|i| i as u32).collect(),
            (
                HostValues::Logits(host),
                Sampling::TopP {
                    temperature, top_p, ..
                },
            ) => {
                let v = host.len() / self.out.len().max(1);
                host.chunks(v)
                    .zip(self.rngs.iter_mut())
                    .map(|(row, rng)| sample_top_p(row, *temperature, *top_p, rng))
                    .collect()
            }
            (HostValues::Logits(_), Sampling::Greedy) => {
                return Err(AvbError::Invalid(
                    "greedy decoding reads ids, not logits".into(),
                ))
            }
        };
        let mut feed = Vec::with_capacity(next.len());
        for (row, &id) in next.iter().enumerate() {
            if self.active[row] {
                self.out[row].ids.push(id);
                if self.opts.stop_ids.contains(&id) {
                    self.out[row].finish = Finish::StopToken;
                    self.active[row] = false;
                }
                if on_token(row, id) == Control::Stop && self.active[row] {
                    self.out[row].finish = Finish::Callback;
                    self.active[row] = false;
                }
            }
            feed.push(Input::ids(vec![id]));
        }
        self.step += 1;
        self.hidden = if !self.active.iter().any(|a| *a) || self.step == self.opts.max_new_tokens {
            None
        } else {
            let last = self.model.config.num_layers - 1;
            Some(self.model.forward_to(&feed, last, Some(&mut self.cache))?)
        };
        Ok(())
    }

    pub fn finish(self) -> Vec<Generation> {
        self.out
    }
}

/// Generate for every input at once. `on_token(row, id)` sees each new token as soon as it is chosen.
pub fn generate(
    model: &Model,
    inputs: &[Input],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> Control,
) -> Result<Vec<Generation>> {
    let mut decoder = Decoder::new(model, inputs, opts)?;
    while let Some(readback) = decoder.readback() {
        decoder.advance(readback.read()?, on_token)?;
    }
    Ok(decoder.finish())
}

/// `generate` with asynchronous device reads (required in the browser).
pub async fn generate_async(
    model: &Model,
    inputs: &[Input],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> Control,
) -> Result<Vec<Generation>> {
    let mut decoder = Decoder::new(model, inputs, opts)?;
    while let Some(readback) = decoder.readback() {
        decoder.advance(readback.read_async().await?, on_token)?;
    }
    Ok(decoder.finish())
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
