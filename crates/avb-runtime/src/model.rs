//! One decoder for the three families, on burn tensors: the backend is whatever `Device` the model lives on
//! (CPU through burn-flex, wgpu/WebGPU, CUDA). Computation is in f32, the way transformers runs a float32 model.
//!
//! Batches are left-padded: row b's real tokens sit at cache indices pad_b.., its positions count from 0 at
//! its first real token, and attention never looks at padding. The residual stream can be read at the output of
//! any block (the forward pass stops there) and input embeddings can be replaced at given positions.

use crate::config::{Family, ModelConfig};
use crate::kernels::{Activation, Epilogue, KernelWeight, QkvInput};
use crate::weights::{LayerTensor, TensorId, WeightSource};
use avb_core::matrix::transpose;
use avb_core::{AvbError, Result};
use avb_model::bundle::{self, Bits};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{activation, Bool, Device, Distribution, Int, Tensor, TensorData};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// One sequence: token ids, and vectors that replace the residual stream at given positions.
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub ids: Vec<u32>,
    pub injections: Vec<Injection>,
}

/// `vector` replaces the residual stream at `position` at the input of block `layer`: layer 0 is the input
/// embedding (the NLA protocol; for Gemma the vector is not scaled by sqrt(d)), a later layer is a residual patch
/// (Patchscopes / SelfIE style, used by zero-shot verbalizer profiles).
#[derive(Clone, Debug)]
pub struct Injection {
    pub position: usize,
    pub layer: usize,
    pub vector: Vec<f32>,
}

impl Input {
    pub fn ids(ids: Vec<u32>) -> Input {
        Input {
            ids,
            injections: Vec::new(),
        }
    }
}

/// How the projection matrices and the LM head are held on the device. Blocks run along the last dimension of the
/// [in, out] matrices (the output dimension): CubeCL's quantized kernels need blocks along the innermost dimension,
/// and GGUF's layout (blocks along `in`) would need [out, in] storage. The embedding table is 8-bit at both compact
/// precisions (blocks along d) and held in f32 for lookups. On the CPU backend the quantized values are held in f32
/// storage: burn-flex's quantized matmul dequantizes the whole weight on every call (SmolLM2's first token took
/// 8 s instead of 0.13 s), and the f32 matmul over the same values gives the same numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// The exact path: f32 weights, parity with transformers' float32 run.
    #[default]
    F32,
    /// The compact path: symmetric 8-bit integers with one f32 scale per block of 32 (burn's Q8S).
    Q8,
    /// The compact path: symmetric 4-bit integers with one f32 scale per block of 32 (burn's Q4S).
    Q4,
}

impl Precision {
    fn bits(self) -> Option<Bits> {
        match self {
            Precision::F32 => None,
            Precision::Q8 => Some(Bits::Q8),
            Precision::Q4 => Some(Bits::Q4),
        }
    }

    fn scheme(self) -> Option<QuantScheme> {
        let value = match self {
            Precision::F32 => return None,
            Precision::Q8 => QuantValue::Q8S,
            Precision::Q4 => QuantValue::Q4S,
        };
        Some(
            QuantScheme::default()
                .with_value(value)
                .with_store(QuantStore::PackedU32(0))
                .per_block([bundle::BLOCK as u8], ScaleDtype::F32),
        )
    }
}

/// Where a model's weights come from.
#[derive(Clone, Copy)]
enum Init<'a> {
    Checkpoint(&'a WeightSource),
    Random,
}

struct Linear {
    /// [in, out], transposed from the checkpoints' [out, in] at load time: a GEMV over a transposed view runs
    /// ~30x slower on the CPU backend than over contiguous rows.
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    /// The same weight as the decode kernels bind it (block-quantized weights on a GPU).
    kernel: KernelWeight,
    /// Multiply by the dequantized weight where the kernels are off (GPU products otherwise read the packed
    /// weight): burn-cubecl 0.22.1's 4-bit matmul asks for 72 KiB of shared memory where wgpu allows 48 KiB (seen
    /// on an H100 through Vulkan).
    dequantize: bool,
}

impl Linear {
    fn new(weight: Tensor<2>, bias: Option<Tensor<1>>, dequantize: bool) -> Linear {
        Linear {
            kernel: KernelWeight::of(&weight),
            weight,
            bias,
            dequantize,
        }
    }

    /// x W (+ bias), then the epilogue; of RMSNorm(x) when `norm` is given (folded into the kernel's product).
    fn forward(
        &self,
        x: Tensor<3>,
        kernels: bool,
        epilogue: Epilogue<'_>,
        norm: PreNorm<'_>,
    ) -> Tensor<3> {
        if kernels {
            if let Some(y) = self.kernel.matvec(&x, self.bias.as_ref(), epilogue, norm) {
                return y;
            }
        }
        let x = apply_norm(x, norm, kernels);
        let weight = if self.dequantize {
            self.weight.clone().dequantize()
        } else {
            self.weight.clone()
        };
        let y = crate::kernels::linear(x, weight, self.bias.clone());
        match epilogue {
            Epilogue::None => y,
            Epilogue::Residual(r) => y + r.clone(),
            Epilogue::Gated(act) => {
                let half = y.dims()[2] / 2;
                act.apply(y.clone().narrow(2, 0, half)) * y.narrow(2, half, half)
            }
        }
    }
}

/// An RMSNorm (weight, eps) still to apply to a projection's input: the kernels fold it into a single row's
/// product, which saves its launch.
type PreNorm<'a> = Option<(&'a Tensor<1>, f32)>;

fn apply_norm(x: Tensor<3>, norm: PreNorm<'_>, kernels: bool) -> Tensor<3> {
    match norm {
        Some((w, eps)) => rms_norm(x, w, eps, kernels),
        None => x,
    }
}

/// The side-by-side parts of a fused projection's output [b, t, sum of widths], as views.
fn narrow_parts(y: Tensor<3>, widths: &[usize]) -> Vec<Tensor<3>> {
    let mut at = 0;
    widths
        .iter()
        .map(|w| {
            at += w;
            y.clone().narrow(2, at - w, *w)
        })
        .collect()
}

/// q, k and v from the projections of the attention input.
fn three(parts: Vec<Tensor<3>>) -> [Tensor<3>; 3] {
    parts.try_into().expect("three projections: q, k, v")
}

/// Projections of one input (q, k, v; gate, up): side by side in one weight, so that decoding runs one matvec
/// for all of them, when that weight fits one WebGPU storage binding; else separate.
enum Projections {
    Fused {
        linear: Box<Linear>,
        widths: Vec<usize>,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Each projection of x (of RMSNorm(x) with `norm`), in order.
    fn split(&self, x: Tensor<3>, kernels: bool, norm: PreNorm<'_>) -> Vec<Tensor<3>> {
        match self {
            Projections::Fused { linear, widths } => {
                narrow_parts(linear.forward(x, kernels, Epilogue::None, norm), widths)
            }
            Projections::Separate(parts) => {
                let x = apply_norm(x, norm, kernels);
                parts
                    .iter()
                    .map(|p| p.forward(x.clone(), kernels, Epilogue::None, None))
                    .collect()
            }
        }
    }

    /// act(gate x) * (up x) for the projections [gate, up] (of RMSNorm(x) with `norm`).
    fn gated(&self, x: Tensor<3>, act: Activation, kernels: bool, norm: PreNorm<'_>) -> Tensor<3> {
        match self {
            Projections::Fused { linear, .. } => {
                linear.forward(x, kernels, Epilogue::Gated(act), norm)
            }
            Projections::Separate(parts) => {
                let x = apply_norm(x, norm, kernels);
                act.apply(parts[0].forward(x.clone(), kernels, Epilogue::None, None))
                    * parts[1].forward(x, kernels, Epilogue::None, None)
            }
        }
    }
}

/// Bytes of one vocabulary range of the embedding table or the LM head (and of one fused projection) on a GPU:
/// in the browser WebGPU's default maxStorageBufferBindingSize; natively 1 GiB (Vulkan and CUDA bind more), so
/// that a decoding step runs few launches over the vocabulary (a Qwen2.5-7B step ran 17 gathers, 17 head
/// products and a 17-part concatenation at 128 MiB).
const VOCAB_PART_BYTES: usize = if cfg!(target_family = "wasm") {
    128 << 20
} else {
    1 << 30
};

/// Vocabulary ranges for tables of `vocab` rows of `row_bytes` each (as stored on the device): one range on the
/// CPU backend (`whole`); on GPUs ranges of a multiple of the quantization block within VOCAB_PART_BYTES.
fn vocab_ranges(vocab: usize, row_bytes: usize, whole: bool) -> Vec<std::ops::Range<usize>> {
    let per = if whole {
        vocab
    } else {
        (VOCAB_PART_BYTES / row_bytes.max(1) / bundle::BLOCK * bundle::BLOCK).max(bundle::BLOCK)
    };
    (0..vocab)
        .step_by(per.max(1))
        .map(|lo| lo..(lo + per).min(vocab))
        .collect()
}

/// The embedding table, in vocabulary ranges.
struct VocabTable {
    ranges: Vec<std::ops::Range<usize>>,
    /// [range length, hidden] each.
    parts: Vec<Tensor<2>>,
}

impl VocabTable {
    /// Rows of `ids` (each checked < vocab), [ids, hidden]: one gather per range the ids touch, then one to restore
    /// their order when they span several ranges.
    fn rows(&self, ids: &[i64], device: &Device) -> Tensor<2> {
        let index = |v: Vec<i64>| -> Tensor<1, Int> {
            let n = v.len();
            Tensor::from_data(TensorData::new(v, [n]), device)
        };
        if self.parts.len() == 1 {
            return self.parts[0].clone().select(0, index(ids.to_vec()));
        }
        let mut gathered = Vec::new();
        let mut order = Vec::with_capacity(ids.len());
        for (r, part) in self.ranges.iter().zip(&self.parts) {
            let (at, local): (Vec<usize>, Vec<i64>) = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| r.contains(&(**id as usize)))
                .map(|(i, id)| (i, *id - r.start as i64))
                .unzip();
            if !local.is_empty() {
                order.extend(at);
                gathered.push(part.clone().select(0, index(local)));
            }
        }
        let x = Tensor::cat(gathered, 0);
        if order.iter().enumerate().all(|(i, o)| i == *o) {
            return x;
        }
        // Row k of x holds ids[order[k]]: invert the permutation.
        let mut inverse = vec![0i64; order.len()];
        for (k, o) in order.iter().enumerate() {
            inverse[*o] = k as i64;
        }
        x.select(0, index(inverse))
    }
}

struct Block {
    attn_norm: Tensor<1>,
    /// [q, k, v]
    qkv: Projections,
    o: Linear,
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
    post_attn_norm: Option<Tensor<1>>,
    ffn_norm: Tensor<1>,
    post_ffn_norm: Option<Tensor<1>>,
    /// [gate, up]
    gate_up: Projections,
    down: Linear,
    window: Option<usize>,
}

/// Keys and values of every layer, [batch, kv_heads, capacity, head_dim], of which the first `len` positions are
/// written. New positions are written in place and attention spans the whole buffer with the unwritten positions
/// masked, so every decoding step runs the same tensor shapes (no growing concatenation, no new kernel shapes).
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Left padding of each row.
    pads: Vec<usize>,
    /// For the kernels: each row's padding, then the cache index of the pass's first new position, [rows + 1]
    /// (i32), written in place before every pass (so that a recorded step reads the current positions).
    cursor: Option<Tensor<1, Int>>,
    /// For the kernels: RoPE angles of every cache position, [capacity, head_dim] (cos of the frequencies, then
    /// their sin): the global table, and the sliding-window layers' one where the family has it.
    rope: Option<(Tensor<2>, Option<Tensor<2>>)>,
    len: usize,
    capacity: usize,
}

/// Cache capacities are rounded up to this many positions, so that runs of similar length share kernel shapes.
const CACHE_BLOCK: usize = 64;

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Each row's left padding: its first cache index that attention reads.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Write the cursor (each row's padding, then the current length) for the next pass, in place when it exists.
    fn write_cursor(&mut self, device: &Device) {
        let values: Vec<i32> = self
            .pads
            .iter()
            .chain([&self.len])
            .map(|v| *v as i32)
            .collect();
        if let Some(c) = &self.cursor {
            if crate::kernels::write_i32(c, &values) {
                return;
            }
        }
        let n = values.len();
        self.cursor = Some(Tensor::from_data(TensorData::new(values, [n]), device));
    }

    /// A device step was recorded and replayed: the cache now holds one more position.
    pub(crate) fn advance(&mut self) {
        self.len += 1;
    }

    /// Undo `advance` (the warm-up run before a recording advanced it once, the recorded run again).
    pub(crate) fn rewind(&mut self) {
        self.len -= 1;
    }

    /// Put `part`, the cache of one prefill of `rows.len()` new sequences, into rows `rows` (finished sequences'
    /// rows) so that its entries end at this cache's current length, while the other rows go on decoding
    /// (continuous batching). A new row's positions still count from its own first token: its padding becomes
    /// the cache indices before it. Room is made first: every row's entries move right when the new prompts
    /// are longer than the current length, and left, over padding that no `live` row reads, when the `room`
    /// positions every row may still write would not fit.
    pub fn splice(
        &mut self,
        rows: &[usize],
        part: &KvCache,
        live: &[usize],
        room: usize,
    ) -> Result<()> {
        let p = part.len;
        if part.pads.len() != rows.len() || rows.iter().any(|r| *r >= self.pads.len()) {
            return Err(AvbError::Invalid(format!(
                "cannot splice a cache of {} rows into rows {rows:?} of a cache of {}",
                part.pads.len(),
                self.pads.len()
            )));
        }
        let Some(device) = self.layers.iter().flatten().next().map(|(k, _)| k.device()) else {
            return Err(AvbError::Invalid(
                "a cache must hold a prefill before sequences are spliced into it".into(),
            ));
        };
        if p > self.len {
            self.shift((p - self.len) as isize, &device);
        }
        if self.len + room > self.capacity {
            let free = live
                .iter()
                .map(|r| self.pads[*r])
                .fold(self.len - p, usize::min);
            self.shift(-(free as isize), &device);
        }
        if self.len + room > self.capacity {
            return Err(AvbError::Invalid(format!(
                "the KV cache of {} positions cannot hold {} + {room}: make it for the longest prompt and twice the token budget",
                self.capacity, self.len
            )));
        }
        let at = self.len - p;
        for (layer, part_layer) in self.layers.iter_mut().zip(&part.layers) {
            let (Some((k, v)), Some((pk, pv))) = (layer.take(), part_layer) else {
                return Err(AvbError::Invalid(
                    "spliced caches must hold every layer".into(),
                ));
            };
            let [_, kvh, _, hd] = k.dims();
            let (mut k, mut v) = (k, v);
            for (j, &r) in rows.iter().enumerate() {
                let to = [r..r + 1, 0..kvh, at..self.len, 0..hd];
                k = k.slice_assign(to.clone(), pk.clone().narrow(0, j, 1).narrow(2, 0, p));
                v = v.slice_assign(to, pv.clone().narrow(0, j, 1).narrow(2, 0, p));
            }
            *layer = Some((k, v));
        }
        for (&r, part_pad) in rows.iter().zip(&part.pads) {
            self.pads[r] = at + part_pad;
        }
        Ok(())
    }

    /// Move every row's entries `delta` positions towards the end (delta > 0) or the start (delta < 0, dropping
    /// the first -delta, which must be padding of every row still read), keeping positions and padding consistent.
    fn shift(&mut self, delta: isize, device: &Device) {
        let (capacity, by) = (self.capacity, delta.unsigned_abs());
        if by == 0 {
            return;
        }
        for layer in self.layers.iter_mut() {
            if let Some((k, v)) = layer.take() {
                let moved = |t: Tensor<4>| {
                    let [b, kvh, _, hd] = t.dims();
                    let zeros = Tensor::zeros([b, kvh, by, hd], device);
                    if delta > 0 {
                        Tensor::cat(vec![zeros, t.narrow(2, 0, capacity - by)], 2)
                    } else {
                        Tensor::cat(vec![t.narrow(2, by, capacity - by), zeros], 2)
                    }
                };
                *layer = Some((moved(k), moved(v)));
            }
        }
        for p in self.pads.iter_mut() {
            *p = p.saturating_add_signed(delta);
        }
        self.len = self.len.saturating_add_signed(delta);
    }
}

pub struct Model {
    pub config: ModelConfig,
    device: Device,
    embed: VocabTable,
    /// [hidden, vocab range] parts of the LM head (the embedding, transposed, when tied).
    head: Vec<Linear>,
    final_norm: Tensor<1>,
    blocks: Vec<Block>,
    embed_scale: Option<f32>,
    inv_freq: Vec<f32>,
    inv_freq_local: Option<Vec<f32>>,
    /// avbridge's own GPU kernels where they apply (on by default; off runs burn's generic ops everywhere).
    kernels: bool,
    /// Record a decoding step once and replay it (CubeCL graphs), where the kernels take whole steps.
    graphs: bool,
    /// Decoding steps this model ran, by how they ran.
    steps: StepCounters,
}

/// Decoding steps run so far: `launched` through burn and CubeCL kernel by kernel, `replayed` from a recording.
/// Reports read them where nothing else shows how steps ran (a browser page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeSteps {
    pub launched: u64,
    pub replayed: u64,
    /// Of the replayed, those queued before the host had read the previous step's ids (the device chains them).
    pub ahead: u64,
}

impl DecodeSteps {
    /// The steps run between `earlier` and these counts.
    pub fn since(self, earlier: DecodeSteps) -> DecodeSteps {
        DecodeSteps {
            launched: self.launched - earlier.launched,
            replayed: self.replayed - earlier.replayed,
            ahead: self.ahead - earlier.ahead,
        }
    }
}

#[derive(Default)]
struct StepCounters {
    launched: AtomicU64,
    replayed: AtomicU64,
    ahead: AtomicU64,
}

fn tensor2(data: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn tensor1(data: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = data.len();
    Tensor::from_data(TensorData::new(data, [n]), device)
}

#[cfg(feature = "cpu")]
fn on_cpu_backend(device: &Device) -> bool {
    *device == Device::flex()
}

#[cfg(not(feature = "cpu"))]
fn on_cpu_backend(_device: &Device) -> bool {
    false
}

/// x * rsqrt(mean(x^2) + eps) * w over the last dimension (one kernel on a GPU when `kernels`).
fn rms_norm<const D: usize>(
    x: Tensor<D>,
    weight: &Tensor<1>,
    eps: f32,
    kernels: bool,
) -> Tensor<D> {
    add_rms_norm(None, x, weight, eps, kernels)
}

/// residual + RMSNorm(x) (Gemma-3's post-norms), or RMSNorm(x) alone: one launch with the kernels.
fn add_rms_norm<const D: usize>(
    residual: Option<Tensor<D>>,
    x: Tensor<D>,
    weight: &Tensor<1>,
    eps: f32,
    kernels: bool,
) -> Tensor<D> {
    if kernels {
        if let Some(y) = crate::kernels::rms_norm(&x, weight, eps, residual.as_ref()) {
            return y;
        }
    }
    let mean_square = x.clone().square().mean_dim(D - 1);
    let y = x * (mean_square + eps).sqrt().recip() * weight.clone().unsqueeze::<D>();
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// The RoPE frequencies (or tables) of a layer: the local ones for sliding-window layers where the family has
/// them, else the global ones.
fn rope_of<'a, T>(window: Option<usize>, global: &'a T, local: Option<&'a T>) -> &'a T {
    match (window, local) {
        (Some(_), Some(local)) => local,
        _ => global,
    }
}

/// Rotate-half RoPE on [batch, heads, seq, head_dim] with cos/sin of [batch, 1, seq, head_dim].
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

fn softcap<const D: usize>(x: Tensor<D>, cap: Option<f32>) -> Tensor<D> {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    }
}

impl Model {
    /// Load a `.gguf` file or a Hugging Face checkpoint directory onto `device`, weights at f32.
    pub fn load(path: &Path, device: &Device) -> Result<Model> {
        Model::load_with(path, device, Precision::F32)
    }

    pub fn load_with(path: &Path, device: &Device, precision: Precision) -> Result<Model> {
        let (src, config) = WeightSource::open(path)?;
        Model::from_source(&src, config, device, precision)
    }

    pub fn from_source(
        src: &WeightSource,
        config: ModelConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<Model> {
        Model::build(Init::Checkpoint(src), config, device, precision)
    }

    /// A model of `config`'s shape with random weights drawn on `device` (seeded): benchmarks of the real AV
    /// shapes (decoding speed does not depend on the values), without multi-GB checkpoints.
    pub fn random(
        config: ModelConfig,
        device: &Device,
        precision: Precision,
        seed: u64,
    ) -> Result<Model> {
        device.seed(seed);
        Model::build(Init::Random, config, device, precision)
    }

    fn build(
        init: Init,
        config: ModelConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<Model> {
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let q_out = c.num_heads * hd;
        let kv_out = c.num_kv_heads * hd;
        let gemma = c.family == Family::Gemma3;
        let norm_offset = if gemma { 1.0 } else { 0.0 };
        let scheme = precision.scheme();
        let host_quantized = on_cpu_backend(device);
        let dequantize = precision == Precision::Q4 && !host_quantized;
        // Row-major [in, out] weights, quantized in blocks along `out` on the compact path.
        let compact = |w: Vec<f32>, shape: [usize; 2]| match (precision.bits(), &scheme) {
            (Some(bits), Some(s)) if shape[1] % bundle::BLOCK == 0 => {
                if host_quantized {
                    let (packed, scales) = bundle::quantize(&w, bits);
                    tensor2(
                        bundle::dequantize(&packed, &scales, bits, w.len()),
                        shape,
                        device,
                    )
                } else {
                    tensor2(w, shape, device).quantize_dynamic(s)
                }
            }
            _ => tensor2(w, shape, device),
        };
        // Random weights are drawn on the device: uniform in +-1/sqrt(fan-in), which keeps activations finite.
        let random = |shape: [usize; 2], fan_in: usize| -> Tensor<2> {
            let a = 1.0 / (fan_in as f64).sqrt();
            Tensor::random(shape, Distribution::Uniform(-a, a), device)
        };
        let compact_random = |shape: [usize; 2]| -> Result<Tensor<2>> {
            let w = random(shape, shape[0]);
            Ok(match (&scheme, host_quantized) {
                (Some(_), true) => compact(to_vec(w.unsqueeze())?, shape),
                (Some(s), false) if shape[1] % bundle::BLOCK == 0 => w.quantize_dynamic(s),
                _ => w,
            })
        };
        // [out, in] from the file, [in, out] on the device.
        let read_t = |id: TensorId, [out, inp]: [usize; 2]| -> Result<Tensor<2>> {
            match init {
                Init::Checkpoint(src) => {
                    Ok(compact(src.read_transposed(c, id, [out, inp])?, [inp, out]))
                }
                Init::Random => compact_random([inp, out]),
            }
        };
        let read_vector = |id: TensorId, n: usize| -> Result<Vec<f32>> {
            match init {
                Init::Checkpoint(src) => src.read(c, id, &[n]),
                // Norm weights of one (zero for Gemma's 1 + w form); small biases.
                Init::Random => Ok(match id {
                    TensorId::Layer(
                        _,
                        LayerTensor::QBias | LayerTensor::KBias | LayerTensor::VBias,
                    ) => {
                        vec![0.01; n]
                    }
                    _ => vec![1.0 - norm_offset; n],
                }),
            }
        };
        let read_norm = |id: TensorId, n: usize| -> Result<Tensor<1>> {
            let mut w = read_vector(id, n)?;
            if norm_offset != 0.0 {
                w.iter_mut().for_each(|x| *x += norm_offset);
            }
            Ok(tensor1(w, device))
        };
        let linear = |l: usize,
                      t: LayerTensor,
                      bias: Option<LayerTensor>,
                      shape: [usize; 2]|
         -> Result<Linear> {
            Ok(Linear::new(
                read_t(TensorId::Layer(l, t), shape)?,
                match bias {
                    Some(b) => Some(tensor1(
                        read_vector(TensorId::Layer(l, b), shape[0])?,
                        device,
                    )),
                    None => None,
                },
                dequantize,
            ))
        };
        // Bytes of an [in, out] projection as stored on the device.
        let stored_bytes = |inp: usize, out: usize| match precision.bits() {
            Some(Bits::Q8) => inp * out,
            Some(Bits::Q4) => inp * out / 2,
            None => inp * out * 4,
        };
        // Bytes of an [in, out] weight as a product may bind it: dequantized to f32 where the kernels are off and
        // the weight is dequantized, so that both paths fit one binding.
        let bound_bytes = |inp: usize, out: usize| match dequantize {
            true => 4 * inp * out,
            false => stored_bytes(inp, out),
        };
        // Parts (weight, bias, out) of one input side by side: [in, sum of outs], one row of every part after
        // another. Quantization blocks (32 along out) straddle two parts only where a width is no multiple of 32.
        let projections = |l: usize,
                           parts: &[(LayerTensor, Option<LayerTensor>, usize)],
                           inp: usize|
         -> Result<Projections> {
            let total: usize = parts.iter().map(|p| p.2).sum();
            if bound_bytes(inp, total) > VOCAB_PART_BYTES {
                return parts
                    .iter()
                    .map(|(t, b, out)| linear(l, *t, *b, [*out, inp]))
                    .collect::<Result<_>>()
                    .map(Projections::Separate);
            }
            let weight = match init {
                Init::Checkpoint(src) => {
                    let mut w = vec![0f32; inp * total];
                    let mut col = 0;
                    for (t, _, out) in parts {
                        let part = src.read_transposed(c, TensorId::Layer(l, *t), [*out, inp])?;
                        for (row, part_row) in
                            w.chunks_exact_mut(total).zip(part.chunks_exact(*out))
                        {
                            row[col..col + out].copy_from_slice(part_row);
                        }
                        col += out;
                    }
                    compact(w, [inp, total])
                }
                Init::Random => compact_random([inp, total])?,
            };
            let bias = match parts
                .iter()
                .map(|p| p.1.map(|b| (b, p.2)))
                .collect::<Option<Vec<_>>>()
            {
                Some(biases) => {
                    let mut v = Vec::with_capacity(total);
                    for (b, n) in biases {
                        v.extend(read_vector(TensorId::Layer(l, b), n)?);
                    }
                    Some(tensor1(v, device))
                }
                None => None,
            };
            Ok(Projections::Fused {
                linear: Box::new(Linear::new(weight, bias, dequantize)),
                widths: parts.iter().map(|p| p.2).collect(),
            })
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let qkv_bias = |b: LayerTensor| c.qkv_bias.then_some(b);
            let norm = |t: LayerTensor, n: usize| read_norm(TensorId::Layer(l, t), n);
            blocks.push(Block {
                attn_norm: norm(LayerTensor::AttnNorm, d)?,
                qkv: projections(
                    l,
                    &[
                        (LayerTensor::Q, qkv_bias(LayerTensor::QBias), q_out),
                        (LayerTensor::K, qkv_bias(LayerTensor::KBias), kv_out),
                        (LayerTensor::V, qkv_bias(LayerTensor::VBias), kv_out),
                    ],
                    d,
                )?,
                o: linear(l, LayerTensor::O, None, [d, q_out])?,
                q_norm: gemma.then(|| norm(LayerTensor::QNorm, hd)).transpose()?,
                k_norm: gemma.then(|| norm(LayerTensor::KNorm, hd)).transpose()?,
                post_attn_norm: gemma
                    .then(|| norm(LayerTensor::PostAttnNorm, d))
                    .transpose()?,
                ffn_norm: norm(LayerTensor::PreFfnNorm, d)?,
                post_ffn_norm: gemma
                    .then(|| norm(LayerTensor::PostFfnNorm, d))
                    .transpose()?,
                gate_up: projections(
                    l,
                    &[
                        (LayerTensor::Gate, None, c.intermediate_size),
                        (LayerTensor::Up, None, c.intermediate_size),
                    ],
                    d,
                )?,
                down: linear(l, LayerTensor::Down, None, [d, c.intermediate_size])?,
                window: c.windows[l],
            });
        }
        // The embedding table (f32) and the LM head (as stored: quantized on the compact path) are held in
        // vocabulary ranges on GPUs, each within a storage binding; the CPU backend holds them whole. Where the
        // head's weight is dequantized for a product (the kernels off), that copy is 4 bytes a weight.
        let ranges = vocab_ranges(c.vocab_size, 4 * d, host_quantized);
        let head_ranges = vocab_ranges(c.vocab_size, bound_bytes(d, 1).max(1), host_quantized);
        let mut embed = Vec::with_capacity(ranges.len());
        let mut head = Vec::with_capacity(head_ranges.len());
        match init {
            Init::Checkpoint(src) => {
                let mut embed_rows = src.read(c, TensorId::Embed, &[c.vocab_size, d])?;
                if scheme.is_some() && d % bundle::BLOCK == 0 {
                    let (packed, scales) = bundle::quantize(&embed_rows, Bits::Q8);
                    embed_rows = bundle::dequantize(&packed, &scales, Bits::Q8, embed_rows.len());
                }
                let tied = c.tie_embeddings && !src.has(c, TensorId::Head);
                // [hidden, vocab] row-major, read once when the head has its own tensor.
                let head_t = if tied {
                    Vec::new()
                } else {
                    src.read_transposed(c, TensorId::Head, [c.vocab_size, d])?
                };
                for r in &head_ranges {
                    let part = if tied {
                        transpose(&embed_rows[r.start * d..r.end * d], r.len(), d)
                    } else {
                        (0..d)
                            .flat_map(|i| {
                                &head_t[i * c.vocab_size + r.start..i * c.vocab_size + r.end]
                            })
                            .copied()
                            .collect()
                    };
                    head.push(Linear::new(compact(part, [d, r.len()]), None, dequantize));
                }
                for r in &ranges {
                    let rows = &embed_rows[r.start * d..r.end * d];
                    embed.push(tensor2(rows.to_vec(), [r.len(), d], device));
                }
            }
            Init::Random => {
                for r in &ranges {
                    embed.push(random([r.len(), d], 1));
                }
                for r in &head_ranges {
                    head.push(Linear::new(compact_random([d, r.len()])?, None, dequantize));
                }
            }
        }
        let final_norm = read_norm(TensorId::FinalNorm, d)?;
        Ok(Model {
            device: device.clone(),
            embed: VocabTable {
                ranges,
                parts: embed,
            },
            head,
            final_norm,
            blocks,
            // transformers multiplies by sqrt(hidden) rounded to the weight dtype (f32 here).
            embed_scale: gemma.then(|| (d as f32).sqrt()),
            inv_freq: c.rope.inv_freq(hd),
            inv_freq_local: c.rope_local.as_ref().map(|r| r.inv_freq(hd)),
            kernels: true,
            graphs: true,
            steps: StepCounters::default(),
            config,
        })
    }

    /// Switch avbridge's own GPU kernels on or off (benchmarks compare both; results agree within float rounding).
    pub fn set_kernels(&mut self, on: bool) {
        self.kernels = on;
    }

    /// Switch recorded and replayed decoding steps on or off (benchmarks compare both; the tokens agree).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    pub fn graphs(&self) -> bool {
        self.graphs
    }

    /// Decoding steps this model has run so far, by how they ran.
    pub fn decode_steps(&self) -> DecodeSteps {
        DecodeSteps {
            launched: self.steps.launched.load(Ordering::Relaxed),
            replayed: self.steps.replayed.load(Ordering::Relaxed),
            ahead: self.steps.ahead.load(Ordering::Relaxed),
        }
    }

    /// Count one decoding step queued ahead of the host's read of the previous one.
    pub(crate) fn count_ahead(&self) {
        self.steps.ahead.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one decoding step, replayed from a recording or launched.
    pub(crate) fn count_step(&self, replayed: bool) {
        let counter = match replayed {
            true => &self.steps.replayed,
            false => &self.steps.launched,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// An empty cache for at least `positions` positions (prompt and new tokens).
    pub fn new_cache(&self, positions: usize) -> KvCache {
        KvCache {
            layers: (0..self.config.num_layers).map(|_| None).collect(),
            pads: Vec::new(),
            cursor: None,
            rope: None,
            len: 0,
            capacity: positions.div_ceil(CACHE_BLOCK).max(1) * CACHE_BLOCK,
        }
    }

    /// Left-pad `inputs` to one length; returns the padded id rows and each row's padding.
    pub fn pad(&self, inputs: &[Input]) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
        let t = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(AvbError::Invalid("every input sequence is empty".into()));
        }
        let mut rows = Vec::with_capacity(inputs.len());
        let mut pads = Vec::with_capacity(inputs.len());
        for input in inputs {
            let pad = t - input.ids.len();
            if input.ids.is_empty() {
                return Err(AvbError::Invalid("an input sequence is empty".into()));
            }
            let mut row = vec![input.ids[0]; pad];
            row.extend_from_slice(&input.ids);
            rows.push(row);
            pads.push(pad);
        }
        Ok((rows, pads))
    }

    /// Input embeddings of padded rows (scaled where the family scales them).
    fn embed(&self, rows: &[Vec<u32>]) -> Result<Tensor<3>> {
        let (b, t) = (rows.len(), rows[0].len());
        let vocab = self.config.vocab_size;
        let mut flat = Vec::with_capacity(b * t);
        for id in rows.iter().flatten() {
            if *id as usize >= vocab {
                return Err(AvbError::Invalid(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                )));
            }
            flat.push(*id as i64);
        }
        let x = self
            .embed
            .rows(&flat, &self.device)
            .reshape([b, t, self.config.hidden_size]);
        Ok(match self.embed_scale {
            Some(s) => x * s,
            None => x,
        })
    }

    /// Check every injection before any work: dimension, position, a layer the pass reaches (<= `last`), finite
    /// values.
    fn check_injections(&self, inputs: &[Input], last: usize) -> Result<()> {
        let d = self.config.hidden_size;
        for (row, input) in inputs.iter().enumerate() {
            for inj in &input.injections {
                if inj.vector.len() != d {
                    return Err(AvbError::dimension(
                        "injected vector",
                        format!(
                            "{} values, the model's hidden size is {d}",
                            inj.vector.len()
                        ),
                        "map the vector into this model's residual space first",
                    ));
                }
                if inj.position >= input.ids.len() {
                    return Err(AvbError::Invalid(format!(
                        "injection at position {} of a {}-token sequence",
                        inj.position,
                        input.ids.len()
                    )));
                }
                if inj.layer > last {
                    return Err(AvbError::Invalid(format!(
                        "injection at the input of block {}, but this pass runs blocks 0..={last} (the model has 0..={})",
                        inj.layer,
                        self.config.num_layers - 1
                    )));
                }
                if let Some(i) = inj.vector.iter().position(|v| !v.is_finite()) {
                    return Err(AvbError::NonFinite {
                        what: "injected vector".into(),
                        row,
                        col: i,
                    });
                }
            }
        }
        Ok(())
    }

    /// Replace the residual rows that `inputs` inject at the input of block `layer`.
    fn inject(
        &self,
        mut x: Tensor<3>,
        pads: &[usize],
        inputs: &[Input],
        layer: usize,
    ) -> Tensor<3> {
        let d = self.config.hidden_size;
        for (row, input) in inputs.iter().enumerate() {
            for inj in input.injections.iter().filter(|i| i.layer == layer) {
                let at = pads[row] + inj.position;
                let v: Tensor<3> =
                    Tensor::from_data(TensorData::new(inj.vector.clone(), [1, 1, d]), &self.device);
                x = x.slice_assign([row..row + 1, at..at + 1, 0..d], v);
            }
        }
        x
    }

    /// cos and sin, [batch, 1, seq, head_dim], for cache indices start..start + seq.
    fn rope_tables(
        &self,
        inv_freq: &[f32],
        pads: &[usize],
        start: usize,
        seq: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let hd = self.config.head_dim;
        let b = pads.len();
        let mut cos = Vec::with_capacity(b * seq * hd);
        let mut sin = Vec::with_capacity(b * seq * hd);
        for &pad in pads {
            for i in start..start + seq {
                let pos = i.saturating_sub(pad) as f32;
                // cat(freqs, freqs): the two halves share frequencies.
                for _ in 0..2 {
                    for f in inv_freq {
                        let angle = pos * f;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
        let shape = [b, 1, seq, hd];
        (
            Tensor::from_data(TensorData::new(cos, shape), &self.device),
            Tensor::from_data(TensorData::new(sin, shape), &self.device),
        )
    }

    /// (q heads, kv heads, head dim).
    fn heads(&self) -> (usize, usize, usize) {
        let c = &self.config;
        (c.num_heads, c.num_kv_heads, c.head_dim)
    }

    /// RoPE angles of positions 0..positions, [positions, head_dim]: cos of the frequencies, then their sin (the
    /// values `rope_tables` computes, each position once).
    fn position_table(&self, inv_freq: &[f32], positions: usize) -> Tensor<2> {
        let hd = self.config.head_dim;
        let mut table = Vec::with_capacity(positions * hd);
        for pos in 0..positions {
            let angles = inv_freq.iter().map(|f| pos as f32 * f);
            table.extend(angles.clone().map(f32::cos));
            table.extend(angles.map(f32::sin));
        }
        tensor2(table, [positions, hd], &self.device)
    }

    /// Make `cache` ready for a kernel pass: its RoPE tables (once) and its cursor (every pass).
    fn prepare_kernel_pass(&self, cache: &mut KvCache) {
        if cache.rope.is_none() {
            let local = self.inv_freq_local.as_ref();
            cache.rope = Some((
                self.position_table(&self.inv_freq, cache.capacity),
                local.map(|f| self.position_table(f, cache.capacity)),
            ));
        }
        cache.write_cursor(&self.device);
    }

    /// Whether the kernels take a whole decoding step of `cache` from ids on the device ([`Model::decode_step`]):
    /// fused q/k/v projections, both per-head norms or neither, a written cache that the decode-attention kernel
    /// scores, on a CubeCL device. Then its tables and cursor are made ready for that step.
    pub(crate) fn prepare_device_step(&self, cache: &mut KvCache) -> bool {
        let applies = self.kernels
            && !cache.is_empty()
            && cache.len < cache.capacity
            && cache.layers.iter().all(Option::is_some)
            && crate::kernels::attends(&self.device, 1, self.heads(), cache.capacity)
            && self.config.head_dim % 2 == 0
            && self.blocks.iter().all(|b| {
                matches!(b.qkv, Projections::Fused { .. })
                    && b.q_norm.is_some() == b.k_norm.is_some()
            });
        if applies {
            self.prepare_kernel_pass(cache);
        }
        applies
    }

    /// One decoding step of every row of `cache` from token ids on the device, `ids` [rows] (i32), entirely
    /// through the kernels: no host data enters it, so it can be recorded once and replayed. Needs
    /// [`Model::prepare_device_step`] first (which writes the cursor the kernels read). Returns the hidden states
    /// of the new positions, [rows, 1, hidden].
    pub(crate) fn decode_step(
        &self,
        ids: &Tensor<1, Int>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let rows = cache.pads.len();
        if ids.dims() != [rows] {
            return Err(AvbError::Invalid(format!(
                "a device step of {rows} cached rows was given {} ids",
                ids.dims()[0]
            )));
        }
        let parts: Vec<(&Tensor<2>, usize)> = self
            .embed
            .parts
            .iter()
            .zip(&self.embed.ranges)
            .map(|(p, r)| (p, r.start))
            .collect();
        let Some(x) = crate::kernels::gather_rows(&parts, ids, self.embed_scale.unwrap_or(1.0))
        else {
            return Err(AvbError::Invalid(
                "the embedding kernel does not apply to this model's table: decode with host ids"
                    .into(),
            ));
        };
        let mut x = x.reshape([rows, 1, self.config.hidden_size]);
        let mut cache = Some(cache);
        for layer in 0..self.config.num_layers {
            x = self.block(layer, x, None, None, &mut cache);
        }
        if let Some(c) = cache {
            c.advance();
        }
        Ok(x)
    }

    /// true = masked, [batch, 1, seq, keys]: causal, no padding keys, and the sliding window if any. Keys past
    /// start + seq (an unwritten cache tail) are masked by causality.
    fn mask(
        &self,
        pads: &[usize],
        start: usize,
        seq: usize,
        keys: usize,
        window: Option<usize>,
    ) -> Tensor<4, Bool> {
        let total = start + seq;
        let mut m = Vec::with_capacity(pads.len() * seq * keys);
        for &pad in pads {
            for i in start..total {
                for j in 0..keys {
                    let visible = j == i || (j < i && j >= pad && window.is_none_or(|w| i - j < w));
                    m.push(!visible);
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [pads.len(), 1, seq, keys]), &self.device)
    }

    /// q, k and v of the new positions: q and k rotated, [b, heads, t, hd] each.
    fn new_qkv(
        &self,
        block: &Block,
        [q, k, v]: [Tensor<3>; 3],
        rope_tables: &(Tensor<4>, Tensor<4>),
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let c = &self.config;
        let [b, t, _] = q.dims();
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_eps as f32;
        let heads = |y: Tensor<3>, n: usize, norm: &Option<Tensor<1>>| {
            let y = y.reshape([b, t, n, hd]);
            let y = match norm {
                Some(w) => rms_norm(y, w, eps, self.kernels),
                None => y,
            };
            if self.kernels {
                if let Some(r) = crate::kernels::rope(&y, &rope_tables.0, &rope_tables.1) {
                    return r;
                }
            }
            rope(y.swap_dims(1, 2), &rope_tables.0, &rope_tables.1)
        };
        (
            heads(q, h, &block.q_norm),
            heads(k, kvh, &block.k_norm),
            v.reshape([b, t, kvh, hd]).swap_dims(1, 2),
        )
    }

    /// Self-attention of the new positions up to, not including, the output projection: [b, t, heads * hd].
    /// `x` is the attention's input before `norm` (the block's input norm) where that is given.
    fn attention(
        &self,
        block: &Block,
        layer: usize,
        (x, norm): (Tensor<3>, PreNorm<'_>),
        rope_tables: Option<&(Tensor<4>, Tensor<4>)>,
        mask: Option<Tensor<4, Bool>>,
        cache: &mut Option<&mut KvCache>,
    ) -> Tensor<3> {
        let c = &self.config;
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        // A device step brings no host tables: where a kernel declines, they are made from the cache's positions.
        let host_tables = |cache: &KvCache| match rope_tables {
            Some(tables) => tables.clone(),
            None => {
                let freq = rope_of(block.window, &self.inv_freq, self.inv_freq_local.as_ref());
                self.rope_tables(freq, &cache.pads, cache.len, t)
            }
        };
        let (q, k, v) = match cache.as_deref_mut() {
            Some(cache) => {
                let (ck, cv) = cache.layers[layer].take().unwrap_or_else(|| {
                    let shape = [b, kvh, cache.capacity, hd];
                    (
                        Tensor::zeros(shape, &self.device),
                        Tensor::zeros(shape, &self.device),
                    )
                });
                // With the kernels and q/k/v fused: one launch normalises q and k per head (when the family
                // does), rotates them and writes k and v into the cache.
                let head_norms = match (&block.q_norm, &block.k_norm) {
                    (Some(qn), Some(kn)) => Some(Some((qn, kn, c.rms_eps as f32))),
                    (None, None) => Some(None),
                    _ => None,
                };
                let table = cache
                    .rope
                    .as_ref()
                    .map(|(global, local)| rope_of(block.window, global, local.as_ref()));
                let (q, ck, cv, parts) = match (&block.qkv, head_norms, table, &cache.cursor) {
                    (
                        Projections::Fused { linear, widths },
                        Some(norms),
                        Some(table),
                        Some(cursor),
                    ) if self.kernels => {
                        // Without per-head norms the projection's partial sums go to the rope launch, which adds
                        // them up (one launch a layer fewer).
                        let sums = match norms {
                            None => linear.kernel.partial_sums(&x, norm),
                            Some(_) => None,
                        };
                        let qkv = sums
                            .is_none()
                            .then(|| linear.forward(x.clone(), true, Epilogue::None, norm));
                        let source = match (&sums, &qkv) {
                            (Some(sums), _) => QkvInput::Partial {
                                sums,
                                bias: linear.bias.as_ref(),
                                t,
                            },
                            (None, Some(qkv)) => QkvInput::Output(qkv),
                            (None, None) => {
                                unreachable!("the product runs when its sums are not kept")
                            }
                        };
                        let (q, ck, cv) = crate::kernels::rope_into_cache(
                            source,
                            table,
                            cursor,
                            h,
                            (ck, cv),
                            norms,
                        );
                        // Where the kernel does not apply, the product serves the generic path.
                        let parts = q.is_none().then(|| {
                            let qkv = qkv
                                .unwrap_or_else(|| linear.forward(x, true, Epilogue::None, norm));
                            narrow_parts(qkv, widths)
                        });
                        (q, ck, cv, parts)
                    }
                    _ => (None, ck, cv, Some(block.qkv.split(x, self.kernels, norm))),
                };
                let (q, k, v) = match (q, parts) {
                    (Some(q), _) => (q, ck, cv),
                    (None, parts) => {
                        let parts = parts.expect("projections when the kernel did not run");
                        let (q, k, v) = self.new_qkv(block, three(parts), &host_tables(cache));
                        let at = [0..b, 0..kvh, cache.len..cache.len + t, 0..hd];
                        (q, ck.slice_assign(at.clone(), k), cv.slice_assign(at, v))
                    }
                };
                cache.layers[layer] = Some((k.clone(), v.clone()));
                (q, k, v)
            }
            None => {
                let tables = rope_tables.expect("a pass without a cache brings its RoPE tables");
                self.new_qkv(block, three(block.qkv.split(x, self.kernels, norm)), tables)
            }
        };
        let total = k.dims()[2];
        let mask = match (mask, cache.as_deref()) {
            (Some(m), _) => m,
            (None, Some(cache)) => {
                if let Some(cursor) = &cache.cursor {
                    let fused = crate::kernels::decode_attention(
                        &q,
                        (&k, &v),
                        cursor,
                        block.window,
                        c.attn_scale,
                        c.attn_softcap,
                    );
                    if let Some(out) = fused {
                        // [b, h, 1, hd] is already [b, 1, h * hd] in memory: no transposing copy.
                        return if t == 1 {
                            out.reshape([b, t, h * hd])
                        } else {
                            out.swap_dims(1, 2).reshape([b, t, h * hd])
                        };
                    }
                }
                self.mask(&cache.pads, cache.len, t, total, block.window)
            }
            (None, None) => self.mask(&vec![0; b], 0, t, total, block.window),
        };
        // Grouped-query attention without repeating K/V: the g query heads of one KV head share a matmul.
        let g = h / kvh;
        let q = q.reshape([b, kvh, g * t, hd]);
        let scores = crate::kernels::matmul(q, k.swap_dims(2, 3)) * c.attn_scale;
        let scores = softcap(scores, c.attn_softcap);
        let mask = mask
            .reshape([b, 1, 1, t, total])
            .expand([b, kvh, g, t, total])
            .reshape([b, kvh, g * t, total]);
        let probs = activation::softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3);
        let out = crate::kernels::matmul(probs, v)
            .reshape([b, h, t, hd])
            .swap_dims(1, 2);
        out.reshape([b, t, h * hd])
    }

    fn block(
        &self,
        layer: usize,
        x: Tensor<3>,
        tables: Option<&(Tensor<4>, Tensor<4>)>,
        mask: Option<Tensor<4, Bool>>,
        cache: &mut Option<&mut KvCache>,
    ) -> Tensor<3> {
        let block = &self.blocks[layer];
        let eps = self.config.rms_eps as f32;
        let on = self.kernels;
        let attn_norm = Some((&block.attn_norm, eps));
        let attn = self.attention(block, layer, (x.clone(), attn_norm), tables, mask, cache);
        let x = self.add_sublayer(x, &block.o, attn, block.post_attn_norm.as_ref());
        let act = match self.config.family {
            Family::Gemma3 => Activation::GeluTanh,
            Family::Qwen2 | Family::Llama => Activation::Silu,
        };
        let ffn_norm = Some((&block.ffn_norm, eps));
        let hidden = block.gate_up.gated(x.clone(), act, on, ffn_norm);
        self.add_sublayer(x, &block.down, hidden, block.post_ffn_norm.as_ref())
    }

    /// residual + output(input), the output post-normed where the family has a post-norm (Gemma-3, the add in
    /// the RMSNorm launch); without one the add rides on the projection's final pass.
    fn add_sublayer(
        &self,
        residual: Tensor<3>,
        output: &Linear,
        input: Tensor<3>,
        post_norm: Option<&Tensor<1>>,
    ) -> Tensor<3> {
        let (on, eps) = (self.kernels, self.config.rms_eps as f32);
        match post_norm {
            Some(w) => add_rms_norm(
                Some(residual),
                output.forward(input, on, Epilogue::None, None),
                w,
                eps,
                on,
            ),
            None => output.forward(input, on, Epilogue::Residual(&residual), None),
        }
    }

    /// Run blocks 0..=last on new positions of `inputs` (appending to `cache` if given) and return the residual
    /// stream at the output of block `last`, [batch, seq, hidden] (left-padded rows).
    pub fn forward_to(
        &self,
        inputs: &[Input],
        last: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        if last >= self.config.num_layers {
            return Err(AvbError::Invalid(format!(
                "layer {last} is out of range: the model has blocks 0..={}",
                self.config.num_layers - 1
            )));
        }
        if inputs.is_empty() {
            return Err(AvbError::Invalid("no input sequences".into()));
        }
        if cache.is_some() && last + 1 != self.config.num_layers {
            return Err(AvbError::Invalid(
                "a KV cache needs the full forward pass (last = final block)".into(),
            ));
        }
        let (rows, pads) = match cache.as_deref() {
            Some(c) if !c.is_empty() => {
                // Continuing: every row brings the same number of new tokens, no new padding.
                let t = inputs[0].ids.len();
                if inputs.iter().any(|i| i.ids.len() != t) || inputs.len() != c.pads.len() {
                    return Err(AvbError::Invalid(
                        "a cached step needs one equal-length continuation per cached row".into(),
                    ));
                }
                (
                    inputs.iter().map(|i| i.ids.clone()).collect(),
                    c.pads.clone(),
                )
            }
            _ => {
                let (rows, pads) = self.pad(inputs)?;
                if let Some(c) = cache.as_deref_mut() {
                    c.pads = pads.clone();
                }
                (rows, pads)
            }
        };
        let start = cache.as_deref().map_or(0, KvCache::len);
        let seq = rows[0].len();
        if start + seq > self.config.max_positions {
            return Err(AvbError::Invalid(format!(
                "{} positions exceed the model's context of {}",
                start + seq,
                self.config.max_positions
            )));
        }
        let keys = match cache.as_deref() {
            Some(c) if start + seq > c.capacity => {
                return Err(AvbError::Invalid(format!(
                    "{} positions exceed the KV cache's {}; make the cache for the prompt and every new token",
                    start + seq,
                    c.capacity
                )))
            }
            Some(c) => c.capacity,
            None => seq,
        };
        self.check_injections(inputs, last)?;
        if let Some(c) = cache.as_deref_mut() {
            if self.kernels && !on_cpu_backend(&self.device) {
                self.prepare_kernel_pass(c);
            }
        }
        let pads_for_inject: Vec<usize> = if start == 0 {
            pads.clone()
        } else {
            vec![0; pads.len()]
        };
        let mut x = self.embed(&rows)?;
        let global = self.rope_tables(&self.inv_freq, &pads, start, seq);
        let local = self
            .inv_freq_local
            .as_ref()
            .map(|f| self.rope_tables(f, &pads, start, seq));
        // The decode-attention kernel masks from the cache's padding itself; other passes get one mask per
        // distinct window (Gemma-3's sliding layers all share one), built once per pass.
        let kernel_attention = self.kernels
            && cache.is_some()
            && crate::kernels::attends(&self.device, seq, self.heads(), keys);
        let mut masks: Vec<(Option<usize>, Tensor<4, Bool>)> = Vec::new();
        for layer in 0..=last {
            let window = self.blocks[layer].window;
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                _ if kernel_attention => None,
                Some((_, m)) => Some(m.clone()),
                None => {
                    let m = self.mask(&pads, start, seq, keys, window);
                    masks.push((window, m.clone()));
                    Some(m)
                }
            };
            let tables = rope_of(window, &global, local.as_ref());
            x = self.inject(x, &pads_for_inject, inputs, layer);
            x = self.block(layer, x, Some(tables), mask, &mut cache);
        }
        if let Some(c) = cache {
            c.len = start + seq;
        }
        Ok(x)
    }

    /// The residual stream at the input of block `layer`, [batch, seq, hidden]: the (scaled) input embeddings
    /// for layer 0, else the output of block layer - 1; injections at blocks <= `layer` in place.
    pub fn residual_at_input(&self, inputs: &[Input], layer: usize) -> Result<Tensor<3>> {
        if layer == 0 {
            self.check_injections(inputs, 0)?;
            let (rows, pads) = self.pad(inputs)?;
            return Ok(self.inject(self.embed(&rows)?, &pads, inputs, 0));
        }
        self.check_injections(inputs, layer)?;
        // Injections at `layer` itself land on the output of block layer - 1.
        let earlier: Vec<Input> = inputs
            .iter()
            .map(|i| Input {
                ids: i.ids.clone(),
                injections: i
                    .injections
                    .iter()
                    .filter(|j| j.layer < layer)
                    .cloned()
                    .collect(),
            })
            .collect();
        let x = self.forward_to(&earlier, layer - 1, None)?;
        let (_, pads) = self.pad(inputs)?;
        Ok(self.inject(x, &pads, inputs, layer))
    }

    /// Each row's index of its largest logit, [b, vocab] -> [b, 1] (the first among equals).
    pub fn argmax(&self, logits: Tensor<2>) -> Tensor<2, Int> {
        crate::kernels::argmax(logits, self.kernels)
    }

    /// Whether sampled steps of `rows` rows choose on the device (`sample_top_p`): the kernels on, on a CubeCL
    /// device, shapes the kernel takes.
    pub(crate) fn samples_on_device(&self, rows: usize) -> bool {
        self.kernels && crate::kernels::samples(&self.device, rows, self.config.vocab_size)
    }

    /// One token per row of logits [b, vocab], drawn on the device from the nucleus of softmax(logits /
    /// temperature) at the row's `units` [b] (uniform draws from the host), as the host's sampler draws it
    /// (`crate::sample`); [b, 1], or `None` where `samples_on_device(b)` does not hold.
    pub(crate) fn sample_top_p(
        &self,
        logits: &Tensor<2>,
        units: &Tensor<1>,
        temperature: f32,
        top_p: f32,
    ) -> Option<Tensor<2, Int>> {
        match self.kernels {
            true => crate::sample::on_device(logits, units, temperature, top_p),
            false => None,
        }
    }

    /// Final norm, LM head and final soft-capping of hidden states [batch, seq, hidden] -> logits.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        // Normalised once for every vocabulary part (their products are too wide to fold it in).
        let x = rms_norm(
            x,
            &self.final_norm,
            self.config.rms_eps as f32,
            self.kernels,
        );
        let mut parts: Vec<Tensor<3>> = self
            .head
            .iter()
            .map(|h| h.forward(x.clone(), self.kernels, Epilogue::None, None))
            .collect();
        let logits = match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(parts, 2),
        };
        softcap(logits, self.config.final_softcap)
    }

    /// Logits of every position, [batch, seq, vocab] (left-padded rows).
    pub fn logits(&self, inputs: &[Input]) -> Result<Tensor<3>> {
        let h = self.forward_to(inputs, self.config.num_layers - 1, None)?;
        Ok(self.head(h))
    }
}

/// Copy a tensor to the host as f32 (blocking; native backends only).
pub fn to_vec(t: Tensor<3>) -> Result<Vec<f32>> {
    let failed =
        |e: &dyn std::fmt::Debug| AvbError::Invalid(format!("reading a tensor back failed: {e:?}"));
    t.try_into_data()
        .map_err(|e| failed(&e))?
        .try_into_vec::<f32>()
        .map_err(|e| failed(&e))
}

/// Device copy bandwidth (bytes read + written per second) of an elementwise pass over 1 GiB of f32: the
/// bandwidth ceiling decoding benchmarks are measured against. Three passes first, so that the timed ones reuse
/// output buffers the allocator already holds, then the mean of 50, as the kernel benchmark times its copy (on the
/// H200 4091-4113 GB/s, where one warm-up pass and 10 timed gave 3779-3866 in the same runs: an understated
/// ceiling, which overstated the fraction of it that decoding reaches).
pub fn copy_bandwidth(device: &Device) -> Result<f64> {
    let n = 1usize << 28;
    let x: Tensor<1> = Tensor::random([n], Distribution::Default, device);
    let sync = || {
        device
            .sync()
            .map_err(|e| AvbError::Invalid(format!("device sync failed: {e:?}")))
    };
    for _ in 0..3 {
        std::hint::black_box(x.clone() + 1.0);
    }
    sync()?;
    let reps = 50;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let y = x.clone() + 1.0;
        std::hint::black_box(y);
    }
    sync()?;
    Ok(2.0 * 4.0 * n as f64 * reps as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_ranges_tile_the_vocabulary_in_blocks() {
        assert_eq!(vocab_ranges(1000, 64, true), vec![0..1000]);
        // f32 rows of 3584 (14336 bytes): 1 GiB holds 74898 rows, rounded down to 74880 (a multiple of 32); the
        // browser's 128 MiB 9362, rounded down to 9344.
        let r = vocab_ranges(152_064, 4 * 3584, false);
        let per = if cfg!(target_family = "wasm") {
            9344
        } else {
            74_880
        };
        assert_eq!(r[0], 0..per);
        assert_eq!(r.last().unwrap().end, 152_064);
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        assert!(r.iter().all(|x| x.len() * 3584 * 4 <= VOCAB_PART_BYTES));
    }

    #[test]
    fn embedding_rows_across_vocabulary_ranges() {
        let device = Device::flex();
        let (vocab, d) = (100, 3);
        let table: Vec<f32> = (0..vocab * d).map(|v| v as f32).collect();
        let ranges = vec![0..32, 32..64, 64..100];
        let parts = ranges
            .iter()
            .map(|r| {
                tensor2(
                    table[r.start * d..r.end * d].to_vec(),
                    [r.len(), d],
                    &device,
                )
            })
            .collect();
        let embed = VocabTable { ranges, parts };
        for ids in [vec![5i64], vec![70, 3, 40, 99, 0, 64, 63, 3], vec![40, 41]] {
            let got = embed
                .rows(&ids, &device)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|id| table[*id as usize * d..(*id as usize + 1) * d].to_vec())
                .collect();
            assert_eq!(got, want, "{ids:?}");
        }
    }
}
