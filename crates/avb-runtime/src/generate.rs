//! Batched generation with a KV cache: sequences of different lengths (left-padded), greedy or
//! temperature + top-p sampling with a seed, stop tokens, a token budget, and a per-token callback that streams
//! and can stop a sequence (stop strings are checked there, on decoded text). With a batch smaller than the
//! inputs, finished sequences' rows are refilled with the next waiting inputs while the others go on decoding
//! (continuous batching): their prompts are prefilled on their own and spliced into the running KV cache.

use crate::model::{Input, KvCache, Model};
use crate::sample::sample_rows;
use avb_core::rng::SplitMix64;
use avb_core::{AvbError, Result};
use burn::tensor::{Int, Tensor, TensorData};

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
    /// Per-input sampling seeds in place of `seed` and the input's index: an input's draws then do not depend
    /// on the batch it lands in.
    pub row_seeds: Option<Vec<u64>>,
    /// Most sequences decoded at once (None: every input in one batch). Waiting inputs take the rows of
    /// finished sequences, a quarter of the batch at a time.
    pub max_batch: Option<usize>,
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

/// What a decoding step needs from the device: the chosen ids (argmax, or sampling from the host's draws, on the
/// device: one small read) or the last logits (sampling on the host, where the kernels do not apply).
#[derive(Clone)]
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
                t.try_into_data()
                    .map_err(read_err)?
                    .convert::<i64>()
                    .try_into_vec()
                    .map_err(read_err)?,
            ),
            Readback::Logits(t) => HostValues::Logits(
                t.try_into_data()
                    .map_err(read_err)?
                    .try_into_vec()
                    .map_err(read_err)?,
            ),
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
/// needs, `advance` consumes them, feeds the chosen tokens, refills finished rows and says whether to go on.
/// Callbacks and results are indexed by input, whatever row an input decodes in.
pub struct Decoder<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    inputs: &'m [Input],
    /// The first input not yet started.
    next_input: usize,
    /// The input each batch row decodes; None once it finished and nothing was waiting.
    rows: Vec<Option<usize>>,
    rngs: Vec<SplitMix64>,
    cache: KvCache,
    out: Vec<Generation>,
    /// Inputs finished since the last `take_finished`.
    finished: Vec<usize>,
    /// The device values the next choice needs; None once decoding is over.
    next: Option<Readback>,
    /// How steps run: from ids on the host (any backend), or from ids on the device, recorded once and replayed.
    steps: Steps,
    /// Sampled steps that choose on the device: each row's uniform draw for its next token, [rows] (f32), written
    /// in place before every step (so that a recorded step reads them), drawn from the row's input's generator
    /// as the host's sampler would draw it. None for greedy decoding or where the logits go to the host.
    units: Option<Tensor<1>>,
}

/// Decoding steps on a CubeCL device with the kernels: the chosen ids are written in place into `ids` and the
/// step runs from there, so that it takes no host data and is recorded once (CubeCL graphs) and then replayed;
/// a refill changes the cache's buffers and the step is recorded again.
enum Steps {
    Host,
    Device(Box<DeviceSteps>),
}

struct DeviceSteps {
    /// [rows] (i32); every device step writes its chosen ids here too (greedy), so that replays chain.
    ids: Tensor<1, Int>,
    recorded: Option<(crate::kernels::StepGraph, Readback)>,
    /// Whether to record (off once a recording failed, or when the model's graphs are off).
    record: bool,
    /// The readback of a step launched one ahead of its turn (see `Decoder::looks_ahead`).
    ahead: Option<Readback>,
}

impl<'m> Decoder<'m> {
    /// Check the options and run the first batch's prompts (prefill).
    pub fn new(
        model: &'m Model,
        inputs: &'m [Input],
        opts: &GenerateOptions,
    ) -> Result<Decoder<'m>> {
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
        let n = inputs.len();
        if let Some(seeds) = &opts.row_seeds {
            if seeds.len() != n {
                return Err(AvbError::Invalid(format!(
                    "{} row seeds for {n} inputs",
                    seeds.len()
                )));
            }
        }
        if opts.max_batch == Some(0) {
            return Err(AvbError::Invalid("a batch of 0 sequences".into()));
        }
        let mut rngs: Vec<SplitMix64> = (0..n)
            .map(|r| match (&opts.row_seeds, &opts.sampling) {
                (Some(seeds), _) => SplitMix64::new(seeds[r]),
                (None, Sampling::TopP { seed, .. }) => {
                    SplitMix64::new(seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
                }
                (None, Sampling::Greedy) => SplitMix64::new(0),
            })
            .collect();
        let batch = opts.max_batch.unwrap_or(n).min(n);
        let prompt = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        // Refilled rows start where the running ones are: room for a whole budget beyond any prompt and a
        // running row's remaining budget keeps shifts (KvCache::splice) rare and always sufficient.
        let budget = if batch < n { 2 } else { 1 } * opts.max_new_tokens;
        let mut cache = model.new_cache(prompt + budget);
        // Sampled steps choose on the device where the kernels take them (decided once: every step then draws
        // the same way), else from logits on the host.
        let on_device =
            matches!(opts.sampling, Sampling::TopP { .. }) && model.samples_on_device(batch);
        let next = if opts.max_new_tokens == 0 || n == 0 {
            None
        } else {
            let hidden = model.forward_to(
                &inputs[..batch],
                model.config.num_layers - 1,
                Some(&mut cache),
            )?;
            let units = device_units(model, on_device, &mut rngs[..batch]);
            Some(choose(
                model,
                &opts.sampling,
                last_position(hidden),
                units.as_ref(),
            )?)
        };
        let units = on_device.then(|| Tensor::zeros([batch], &model.device()));
        let steps = match next.is_some() && model.prepare_device_step(&mut cache) {
            true => Steps::Device(Box::new(DeviceSteps {
                ids: Tensor::from_data(
                    TensorData::new(vec![0i32; batch], [batch]),
                    &model.device(),
                ),
                recorded: None,
                record: model.graphs(),
                ahead: None,
            })),
            false => Steps::Host,
        };
        Ok(Decoder {
            model,
            opts: opts.clone(),
            inputs,
            next_input: batch,
            rows: (0..batch).map(Some).collect(),
            rngs,
            cache,
            out: (0..n)
                .map(|_| Generation {
                    ids: Vec::new(),
                    finish: Finish::Length,
                })
                .collect(),
            finished: Vec::new(),
            next,
            steps,
            units,
        })
    }

    /// What to read from the device for the next tokens; None when decoding is over.
    pub fn readback(&self) -> Option<Readback> {
        self.next.clone()
    }

    /// Run the next step of every row from `next` (the chosen ids): the readback of the step after.
    fn step(&mut self, next: &[u32]) -> Result<Readback> {
        let model = self.model;
        if let Steps::Device(device) = &self.steps {
            let ids = &device.ids;
            if model.prepare_device_step(&mut self.cache) {
                let values: Vec<i32> = next.iter().map(|i| *i as i32).collect();
                if !crate::kernels::write_i32(ids, &values) {
                    return Err(AvbError::Invalid(
                        "writing a step's token ids to the device failed".into(),
                    ));
                }
                return self.device_step();
            }
            // The cache no longer fits the kernels (e.g. it grew past the attention kernel's limit).
            self.steps = Steps::Host;
        }
        model.count_step(false);
        let feed: Vec<Input> = next.iter().map(|id| Input::ids(vec![*id])).collect();
        let hidden = model.forward_to(&feed, model.config.num_layers - 1, Some(&mut self.cache))?;
        let units = self.write_units()?;
        choose(model, &self.opts.sampling, hidden, units.as_ref())
    }

    /// A step from the ids on the device: replayed when recorded, else run (and recorded when asked).
    fn device_step(&mut self) -> Result<Readback> {
        let units = self.write_units()?;
        let (model, sampling) = (self.model, &self.opts.sampling);
        let Steps::Device(device) = &mut self.steps else {
            return Err(AvbError::Invalid("not decoding on the device".into()));
        };
        let DeviceSteps {
            ids,
            recorded,
            record,
            ..
        } = device.as_mut();
        let run = |cache: &mut KvCache| -> Result<Readback> {
            let hidden = model.decode_step(ids, cache)?;
            let out = choose(model, sampling, hidden, units.as_ref())?;
            // The next step's ids, on the device: a step launched ahead reads them from here, so a copy that
            // cannot be made must stop decoding rather than let that step read stale ids.
            if let Readback::Ids(chosen) = &out {
                if !crate::kernels::copy_i32_into(chosen, ids) {
                    return Err(AvbError::Invalid(
                        "copying a step's token ids on the device failed".into(),
                    ));
                }
            }
            Ok(out)
        };
        if let Some((graph, out)) = recorded {
            graph
                .replay()
                .map_err(|e| AvbError::Invalid(format!("replaying a decoding step failed: {e}")))?;
            self.cache.advance();
            model.count_step(true);
            // The next replay writes the same buffer, possibly before these ids are read: keep a copy.
            return Ok(match out {
                Readback::Ids(chosen) => {
                    Readback::Ids(crate::kernels::snapshot_i32(chosen).ok_or_else(|| {
                        AvbError::Invalid("keeping a replayed step's ids failed".into())
                    })?)
                }
                logits => logits.clone(),
            });
        }
        // Every way on runs the step once for real (a recording's own run only records).
        model.count_step(false);
        if !*record {
            return run(&mut self.cache);
        }
        let Some(Ok(recording)) = crate::kernels::Recording::prepare(ids) else {
            *record = false;
            return run(&mut self.cache);
        };
        // The warm-up runs this step for real; the recorded run is launched into the graph only.
        let warm = run(&mut self.cache)?;
        self.cache.rewind();
        if recording.start().is_err() {
            // Nothing was recorded: go on launching.
            self.cache.advance();
            *record = false;
            return Ok(warm);
        }
        let out = run(&mut self.cache);
        match (recording.finish(), out) {
            (Ok(graph), Ok(out)) => *recorded = Some((graph, out)),
            // A recording that cannot seal leaves the buffers its launches name marked as failed in CubeCL: later
            // reads of them fail, so decoding stops here with the reason rather than on a confusing read error.
            (Err(e), _) => {
                return Err(AvbError::Invalid(format!(
                    "recording a decoding step failed ({e}); decode with recorded steps off (`--no-graphs`)"
                )))
            }
            (_, Err(e)) => return Err(e),
        }
        Ok(warm)
    }

    /// Choose the next token of every running sequence from `host`, report it through `on_token(input, id)`,
    /// run the next step and start waiting inputs in the rows that finished.
    pub fn advance(
        &mut self,
        host: HostValues,
        on_token: &mut dyn FnMut(usize, u32) -> Control,
    ) -> Result<()> {
        let n_rows = self.rows.len();
        let next: Vec<u32> = match (host, &self.opts.sampling) {
            (HostValues::Ids(ids), _) => ids.into_iter().map(|i| i as u32).collect(),
            (
                HostValues::Logits(host),
                Sampling::TopP {
                    temperature, top_p, ..
                },
            ) => {
                // Each input decodes in one row at most: its generator goes to that row.
                let mut by_input: Vec<Option<&mut SplitMix64>> =
                    self.rngs.iter_mut().map(Some).collect();
                let rngs = self
                    .rows
                    .iter()
                    .map(|input| input.and_then(|i| by_input[i].take()))
                    .collect();
                let vocab = host.len() / n_rows.max(1);
                sample_rows(&host, vocab, rngs, *temperature, *top_p)
            }
            (HostValues::Logits(_), Sampling::Greedy) => {
                return Err(AvbError::Invalid(
                    "greedy decoding reads ids, not logits".into(),
                ))
            }
        };
        for (row, &id) in next.iter().enumerate() {
            let Some(i) = self.rows[row] else { continue };
            let out = &mut self.out[i];
            out.ids.push(id);
            let finish = if self.opts.stop_ids.contains(&id) {
                Some(Finish::StopToken)
            } else {
                None
            };
            let finish = match on_token(i, id) {
                Control::Stop if finish.is_none() => Some(Finish::Callback),
                _ if finish.is_none() && out.ids.len() == self.opts.max_new_tokens => {
                    Some(Finish::Length)
                }
                _ => finish,
            };
            if let Some(f) = finish {
                self.out[i].finish = f;
                self.finished.push(i);
                self.rows[row] = None;
            }
        }
        let last = self.model.config.num_layers - 1;
        let Some(mut upcoming) = self.next.take() else {
            return Err(AvbError::Invalid(
                "decoding is over: nothing to advance".into(),
            ));
        };
        if self.rows.iter().any(Option::is_some) {
            upcoming = match self.take_ahead() {
                Some(launched) => launched,
                None => self.step(&next)?,
            };
            if self.looks_ahead() && self.model.prepare_device_step(&mut self.cache) {
                let launched = self.device_step()?;
                self.model.count_ahead();
                if let Steps::Device(device) = &mut self.steps {
                    device.ahead = Some(launched);
                }
            }
        }
        let free: Vec<usize> = (0..n_rows).filter(|r| self.rows[*r].is_none()).collect();
        let start = self.next_input;
        let starting = free.len().min(self.inputs.len() - start);
        // A prefill stops every running row for a while: start waiting inputs once a quarter of the rows are
        // free (or all the rest fit, or nothing runs), so that one prefill serves several rows. On the H200
        // (Qwen2.5-7B shape, batch 16) refilling every row at once ran 0.77x as fast as fixed chunks, a quarter
        // at a time 1.07x.
        let enough = (n_rows / 4).max(1).min(self.inputs.len() - start);
        if starting > 0 && (starting >= enough || free.len() == n_rows) {
            let prompts = &self.inputs[start..start + starting];
            let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
            let mut part = self.model.new_cache(longest);
            let started = last_position(self.model.forward_to(prompts, last, Some(&mut part))?);
            let units = device_units(
                self.model,
                self.units.is_some(),
                &mut self.rngs[start..start + starting],
            );
            let started = choose(self.model, &self.opts.sampling, started, units.as_ref())?;
            let live: Vec<usize> = (0..n_rows).filter(|r| self.rows[*r].is_some()).collect();
            // A row feeds at most max_new_tokens - 1 more tokens (the last one chosen is not fed).
            let room = self.opts.max_new_tokens.saturating_sub(1);
            let rows = &free[..starting];
            // The splice may move the cache into new buffers: the recorded step is recorded again.
            if let Steps::Device(device) = &mut self.steps {
                device.recorded = None;
            }
            self.cache.splice(rows, &part, &live, room)?;
            for (j, &row) in rows.iter().enumerate() {
                upcoming = upcoming.with_row(row, started.row(j));
                self.rows[row] = Some(start + j);
            }
            self.next_input += starting;
        }
        self.next = Some(upcoming).filter(|_| self.rows.iter().any(Option::is_some));
        Ok(())
    }

    /// Whether to launch the step after the one just launched now, before the host has its ids: where a recorded
    /// greedy step chains its ids on the device, no input waits to start (a refill would change the rows and the
    /// recording), and some running row still needs that step. The device then runs the next step while the host
    /// reads this one and queues the one after, instead of waiting on the host between steps; a row that stops
    /// on a stop token has run one step for nothing.
    fn looks_ahead(&self) -> bool {
        let Steps::Device(device) = &self.steps else {
            return false;
        };
        device.recorded.is_some()
            && device.ahead.is_none()
            && (matches!(self.opts.sampling, Sampling::Greedy) || self.units.is_some())
            && self.next_input == self.inputs.len()
            && self
                .rows
                .iter()
                .flatten()
                .any(|&i| self.out[i].ids.len() + 2 <= self.opts.max_new_tokens)
    }

    /// The running rows' draws for their next tokens, written into `units` (see there); None when the logits go
    /// to the host.
    fn write_units(&mut self) -> Result<Option<Tensor<1>>> {
        let Some(units) = &self.units else {
            return Ok(None);
        };
        let draws: Vec<f32> = self
            .rows
            .iter()
            .map(|input| input.map_or(0.0, |i| self.rngs[i].unit_f64() as f32))
            .collect();
        if !crate::kernels::write_f32(units, &draws) {
            return Err(AvbError::Invalid(
                "writing a sampled step's draws to the device failed".into(),
            ));
        }
        Ok(Some(units.clone()))
    }

    /// The step launched ahead, if any (taken).
    fn take_ahead(&mut self) -> Option<Readback> {
        match &mut self.steps {
            Steps::Device(device) => device.ahead.take(),
            Steps::Host => None,
        }
    }

    /// The inputs that finished since the last call, with their generations (taken: `finish` then holds empty
    /// generations for them).
    pub fn take_finished(&mut self) -> Vec<(usize, Generation)> {
        self.finished
            .drain(..)
            .map(|i| {
                let empty = Generation {
                    ids: Vec::new(),
                    finish: Finish::Length,
                };
                (i, std::mem::replace(&mut self.out[i], empty))
            })
            .collect()
    }

    /// Every input's generation, in input order.
    pub fn finish(self) -> Vec<Generation> {
        self.out
    }
}

impl Readback {
    /// Row `j`, as a readback of one row.
    fn row(&self, j: usize) -> Readback {
        match self {
            Readback::Ids(t) => Readback::Ids(t.clone().narrow(0, j, 1)),
            Readback::Logits(t) => Readback::Logits(t.clone().narrow(0, j, 1)),
        }
    }

    /// This readback with row `row` replaced by `one` (a one-row readback of the same kind).
    fn with_row(self, row: usize, one: Readback) -> Readback {
        match (self, one) {
            (Readback::Ids(t), Readback::Ids(o)) => {
                let w = t.dims()[1];
                Readback::Ids(t.slice_assign([row..row + 1, 0..w], o))
            }
            (Readback::Logits(t), Readback::Logits(o)) => {
                let w = t.dims()[1];
                Readback::Logits(t.slice_assign([row..row + 1, 0..w], o))
            }
            (same, _) => same,
        }
    }
}

/// The device values the choice after hidden states [b, 1, d] needs: the LM head, then the argmax or, with the
/// rows' draws (`units`), the sampled ids on the device; else the logits, for the host's sampler. An error where
/// the device's sampler declines a step the decoder chose it for (the host's sampler would then take second
/// draws).
fn choose(
    model: &Model,
    sampling: &Sampling,
    hidden: Tensor<3>,
    units: Option<&Tensor<1>>,
) -> Result<Readback> {
    let logits = model.head(hidden).squeeze_dim::<2>(1);
    Ok(match (sampling, units) {
        (Sampling::Greedy, _) => Readback::Ids(model.argmax(logits)),
        (
            Sampling::TopP {
                temperature, top_p, ..
            },
            Some(units),
        ) => Readback::Ids(
            model
                .sample_top_p(&logits, units, *temperature, *top_p)
                .ok_or_else(|| {
                    AvbError::Invalid(format!(
                        "the device's sampler declined logits {:?}; decode with the kernels off to sample on the host",
                        logits.dims()
                    ))
                })?,
        ),
        (Sampling::TopP { .. }, None) => Readback::Logits(logits),
    })
}

/// For sampled decoding on the device, the next draw of each of these inputs' generators, [inputs] on the device
/// (the tokens their prompts' logits choose); None otherwise.
fn device_units(model: &Model, on_device: bool, rngs: &mut [SplitMix64]) -> Option<Tensor<1>> {
    on_device.then(|| {
        let draws: Vec<f32> = rngs.iter_mut().map(|r| r.unit_f64() as f32).collect();
        let n = draws.len();
        Tensor::from_data(TensorData::new(draws, [n]), &model.device())
    })
}

/// [b, t, d] -> the last position, [b, 1, d].
fn last_position(h: Tensor<3>) -> Tensor<3> {
    let t = h.dims()[1];
    h.narrow(1, t - 1, 1)
}

/// Generate for every input (`opts.max_batch` at a time, refilled as they finish). `on_token(input, id)` sees
/// each new token as soon as it is chosen.
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
