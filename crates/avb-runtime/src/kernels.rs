//! The runtime's door to avbridge's own GPU kernels (shaders/): used when a tensor lives on a CubeCL device
//! (wgpu, WebGPU, CUDA) and the kernels are switched on, with burn's generic tensor ops as the path everywhere else.

use burn::tensor::{Int, Tensor};

/// A projection weight as the decode kernels read it (block-quantized weights on a CubeCL device only).
pub(crate) struct KernelWeight {
    #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
    packed: Option<avb_shaders::QuantizedWeight>,
}

impl KernelWeight {
    #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
    pub(crate) fn of(weight: &Tensor<2>) -> KernelWeight {
        KernelWeight {
            packed: avb_shaders::QuantizedWeight::from_tensor(weight),
        }
    }

    #[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
    pub(crate) fn of(_weight: &Tensor<2>) -> KernelWeight {
        KernelWeight {}
    }

    /// x W (+ bias), then the epilogue, for x [b, t, in] (of RMSNorm(x) with `norm`) through the quantized matvec
    /// kernel when it applies (few rows), else `None`.
    #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
    pub(crate) fn matvec(
        &self,
        x: &Tensor<3>,
        bias: Option<&Tensor<1>>,
        epilogue: Epilogue<'_>,
        norm: Option<(&Tensor<1>, f32)>,
    ) -> Option<Tensor<3>> {
        use avb_shaders::Epilogue as Fused;
        let [b, t, k] = x.dims();
        let residual = match epilogue {
            Epilogue::Residual(r) => Some(r.clone().reshape([b * t, r.dims()[2]])),
            _ => None,
        };
        let fused = match (epilogue, &residual) {
            (Epilogue::None, _) => Fused::None,
            (Epilogue::Residual(_), Some(r)) => Fused::Residual(r),
            (Epilogue::Residual(_), None) => return None,
            (Epilogue::Gated(Activation::Silu), _) => Fused::Gated(avb_shaders::Activation::Silu),
            (Epilogue::Gated(Activation::GeluTanh), _) => {
                Fused::Gated(avb_shaders::Activation::GeluTanh)
            }
        };
        let y = self
            .packed
            .as_ref()?
            .matvec(&x.clone().reshape([b * t, k]), bias, fused, norm)?;
        let out = y.dims()[1];
        Some(y.reshape([b, t, out]))
    }

    #[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
    pub(crate) fn matvec(
        &self,
        _x: &Tensor<3>,
        _bias: Option<&Tensor<1>>,
        _epilogue: Epilogue<'_>,
        _norm: Option<(&Tensor<1>, f32)>,
    ) -> Option<Tensor<3>> {
        None
    }

    /// The product's partial sums over chunks of k, [chunks, b * t, out], for x [b, t, in] (of RMSNorm(x) with
    /// `norm`), for a kernel that adds them up itself; `None` where `matvec` would decline.
    #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
    pub(crate) fn partial_sums(
        &self,
        x: &Tensor<3>,
        norm: Option<(&Tensor<1>, f32)>,
    ) -> Option<Tensor<3>> {
        let [b, t, k] = x.dims();
        self.packed
            .as_ref()?
            .partial_sums(&x.clone().reshape([b * t, k]), norm)
    }

    #[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
    pub(crate) fn partial_sums(
        &self,
        _x: &Tensor<3>,
        _norm: Option<(&Tensor<1>, f32)>,
    ) -> Option<Tensor<3>> {
        None
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Activation {
    Silu,
    /// GELU with the tanh approximation (Gemma's gelu_pytorch_tanh).
    GeluTanh,
}

impl Activation {
    pub(crate) fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Silu => burn::tensor::activation::silu(x),
            Activation::GeluTanh => burn::tensor::activation::gelu_approximate(x),
        }
    }
}

/// What follows a projection, done by the matvec kernel's final pass on GPUs and by tensor ops elsewhere.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    None,
    /// + the residual stream, [b, t, out].
    Residual(&'a Tensor<3>),
    /// The weight holds [gate | up]: act(gate) * up, half as wide.
    Gated(Activation),
}

/// a b, kept in f32: avbridge's product where burn's generic matmul would stage f32 inputs as TF32 (CUDA), else
/// burn's. Not a speed kernel, so taken with the kernels on or off.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    exact_product(&a, &b).unwrap_or_else(|| a.matmul(b))
}

/// x W + bias for x [b, t, in] and W [in, out], kept in f32 as [`matmul`] is.
pub(crate) fn linear(x: Tensor<3>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<3> {
    match exact_product(&x, &weight.clone().unsqueeze::<3>()) {
        Some(y) => match bias {
            Some(b) => y + b.unsqueeze::<3>(),
            None => y,
        },
        None => burn::tensor::module::linear(x, weight, bias),
    }
}

#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
fn exact_product<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> Option<Tensor<D>> {
    avb_shaders::matmul_rounds_to_tf32(a)
        .then(|| avb_shaders::matmul_f32(a, b))
        .flatten()
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
fn exact_product<const D: usize>(_a: &Tensor<D>, _b: &Tensor<D>) -> Option<Tensor<D>> {
    None
}

/// RMSNorm in one kernel when `x` lives on a CubeCL device, else `None`.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn rms_norm<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<1>,
    eps: f32,
    residual: Option<&Tensor<D>>,
) -> Option<Tensor<D>> {
    avb_shaders::rms_norm(x, weight, eps, residual)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn rms_norm<const D: usize>(
    _x: &Tensor<D>,
    _weight: &Tensor<1>,
    _eps: f32,
    _residual: Option<&Tensor<D>>,
) -> Option<Tensor<D>> {
    None
}

/// Whether the decode-attention kernel takes a step of this shape on `device`: one new position per row, and heads
/// (q heads, kv heads, head dim) and a cache of `keys` positions it scores in shared memory.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn attends(
    device: &burn::tensor::Device,
    new_positions: usize,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    keys: usize,
) -> bool {
    new_positions == 1
        && avb_shaders::decode_attention_fits(heads, kv_heads, head_dim, keys)
        && avb_shaders::on_cube(device)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn attends(
    _device: &burn::tensor::Device,
    _new_positions: usize,
    _heads: (usize, usize, usize),
    _keys: usize,
) -> bool {
    false
}

/// The newest position's attention over the KV cache in one kernel (see avb_shaders::decode_attention).
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn decode_attention(
    q: &Tensor<4>,
    cache: (&Tensor<4>, &Tensor<4>),
    cursor: &Tensor<1, Int>,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Option<Tensor<4>> {
    avb_shaders::decode_attention(q, cache, cursor, window, scale, softcap)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn decode_attention(
    _q: &Tensor<4>,
    _cache: (&Tensor<4>, &Tensor<4>),
    _cursor: &Tensor<1, Int>,
    _window: Option<usize>,
    _scale: f32,
    _softcap: Option<f32>,
) -> Option<Tensor<4>> {
    None
}

/// Embedding rows of ids on the device from a table in vocabulary ranges (see avb_shaders::gather_rows).
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn gather_rows(
    parts: &[(&Tensor<2>, usize)],
    ids: &Tensor<1, Int>,
    scale: f32,
) -> Option<Tensor<2>> {
    avb_shaders::gather_rows(parts, ids, scale)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn gather_rows(
    _parts: &[(&Tensor<2>, usize)],
    _ids: &Tensor<1, Int>,
    _scale: f32,
) -> Option<Tensor<2>> {
    None
}

/// Overwrite an i32 tensor's buffer in place; false where it cannot (off a CubeCL device, another length or dtype).
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn write_i32(t: &Tensor<1, Int>, values: &[i32]) -> bool {
    avb_shaders::write_i32(t, values)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn write_i32(_t: &Tensor<1, Int>, _values: &[i32]) -> bool {
    false
}

/// Copy a step's chosen ids (i32) into the ids the next step reads, in place; false where it cannot.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn copy_i32_into(src: &Tensor<2, Int>, dst: &Tensor<1, Int>) -> bool {
    avb_shaders::copy_i32_into(src, dst)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn copy_i32_into(_src: &Tensor<2, Int>, _dst: &Tensor<1, Int>) -> bool {
    false
}

/// A copy of an i32 tensor in a buffer of its own, `None` where it cannot.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn snapshot_i32(src: &Tensor<2, Int>) -> Option<Tensor<2, Int>> {
    avb_shaders::snapshot_i32(src)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn snapshot_i32(_src: &Tensor<2, Int>) -> Option<Tensor<2, Int>> {
    None
}

#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) use avb_shaders::{Recording, StepGraph};

/// Without a CubeCL backend nothing is recorded: `prepare` answers `None`.
#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) enum Recording {}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
impl Recording {
    pub(crate) fn prepare(_anchor: &Tensor<1, Int>) -> Option<Result<Recording, String>> {
        None
    }
    pub(crate) fn start(&self) -> Result<(), String> {
        match *self {}
    }
    pub(crate) fn finish(self) -> Result<StepGraph, String> {
        match self {}
    }
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) enum StepGraph {}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
impl StepGraph {
    pub(crate) fn replay(&self) -> Result<(), String> {
        match *self {}
    }
}

/// RoPE of `x` [b, t, heads, hd] into [b, heads, t, hd] in one kernel on a CubeCL device, else `None`.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn rope(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    avb_shaders::rope(x, cos, sin)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn rope(_x: &Tensor<4>, _cos: &Tensor<4>, _sin: &Tensor<4>) -> Option<Tensor<4>> {
    None
}

/// Per-head q and k norm weights and eps (Gemma-3), applied before RoPE.
pub(crate) type HeadNorms<'a> = Option<(&'a Tensor<1>, &'a Tensor<1>, f32)>;

/// Where `rope_into_cache` reads the fused q/k/v projection from (read by the kernel only: builds without a GPU
/// backend never look inside).
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")),
    allow(dead_code)
)]
pub(crate) enum QkvInput<'a> {
    /// Its output, [b, t, width].
    Output(&'a Tensor<3>),
    /// Its partial sums ([`KernelWeight::partial_sums`]) and bias, added up by the kernel itself.
    Partial {
        sums: &'a Tensor<3>,
        bias: Option<&'a Tensor<1>>,
        t: usize,
    },
}

/// A step's q rotated, and k rotated and v written into the KV cache at the cursor's index, from the fused
/// projection, each q and k head normalised first when `head_norms` are given, in one kernel (see
/// avb_shaders::rope_into_cache): (q, keys, values), q `None` and the caches untouched when it does not apply.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn rope_into_cache(
    qkv: QkvInput<'_>,
    table: &Tensor<2>,
    cursor: &Tensor<1, Int>,
    heads: usize,
    cache: (Tensor<4>, Tensor<4>),
    head_norms: HeadNorms<'_>,
) -> (Option<Tensor<4>>, Tensor<4>, Tensor<4>) {
    use avb_shaders::QkvSource;
    let source = match qkv {
        QkvInput::Output(qkv) => QkvSource::Output(qkv),
        QkvInput::Partial { sums, bias, t } => QkvSource::Partial { sums, bias, t },
    };
    avb_shaders::rope_into_cache(source, table, cursor, heads, cache, head_norms)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn rope_into_cache(
    _qkv: QkvInput<'_>,
    _table: &Tensor<2>,
    _cursor: &Tensor<1, Int>,
    _heads: usize,
    (keys, values): (Tensor<4>, Tensor<4>),
    _head_norms: HeadNorms<'_>,
) -> (Option<Tensor<4>>, Tensor<4>, Tensor<4>) {
    (None, keys, values)
}

/// Each row's index of its largest value, [b, n] -> [b, 1], in one kernel on a CubeCL device with the kernels on,
/// else through burn's argmax.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn argmax(x: Tensor<2>, on: bool) -> Tensor<2, Int> {
    match on.then(|| avb_shaders::argmax(&x)).flatten() {
        Some(ids) => ids,
        None => x.argmax(1),
    }
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn argmax(x: Tensor<2>, _on: bool) -> Tensor<2, Int> {
    x.argmax(1)
}

/// One token per row of logits [b, vocab] drawn on the device from the nucleus of softmax(logits / temperature)
/// at the row's `units` [b] (the host's draws), [b, 1]; `None` where the kernels do not apply (then the logits go
/// to the host's sampler).
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn sample_top_p(
    logits: &Tensor<2>,
    units: &Tensor<1>,
    temperature: f32,
    top_p: f32,
) -> Option<Tensor<2, Int>> {
    avb_shaders::sample_top_p(logits, units, temperature, top_p)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn sample_top_p(
    _logits: &Tensor<2>,
    _units: &Tensor<1>,
    _temperature: f32,
    _top_p: f32,
) -> Option<Tensor<2, Int>> {
    None
}

/// Whether `sample_top_p` takes `rows` rows of `vocab` f32 logits on `device`.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn samples(device: &burn::tensor::Device, rows: usize, vocab: usize) -> bool {
    avb_shaders::sample_fits(rows, vocab) && avb_shaders::on_cube(device)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn samples(_device: &burn::tensor::Device, _rows: usize, _vocab: usize) -> bool {
    false
}

/// `write_i32` for f32 values.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn write_f32(t: &Tensor<1>, values: &[f32]) -> bool {
    avb_shaders::write_f32(t, values)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn write_f32(_t: &Tensor<1>, _values: &[f32]) -> bool {
    false
}
