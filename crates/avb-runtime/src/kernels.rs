//! The runtime's door to avbridge's own GPU kernels (shaders/): used when a tensor lives on a CubeCL device
//! (wgpu, WebGPU, CUDA) and the kernels are switched on, with burn's generic tensor ops as the path everywhere else.

use burn::tensor::Tensor;

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

    /// x W (+ bias) for x [b, t, in] through the quantized matvec kernel when it applies (few rows), else `None`.
    #[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
    pub(crate) fn matvec(&self, x: &Tensor<3>, bias: Option<&Tensor<1>>) -> Option<Tensor<3>> {
        let [b, t, k] = x.dims();
        let y = self
            .packed
            .as_ref()?
            .matvec(&x.clone().reshape([b * t, k]), bias)?;
        let out = y.dims()[1];
        Some(y.reshape([b, t, out]))
    }

    #[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
    pub(crate) fn matvec(&self, _x: &Tensor<3>, _bias: Option<&Tensor<1>>) -> Option<Tensor<3>> {
        None
    }
}

/// RMSNorm in one kernel when `x` lives on a CubeCL device, else `None`.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn rms_norm<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<1>,
    eps: f32,
) -> Option<Tensor<D>> {
    avb_shaders::rms_norm(x, weight, eps)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn rms_norm<const D: usize>(
    _x: &Tensor<D>,
    _weight: &Tensor<1>,
    _eps: f32,
) -> Option<Tensor<D>> {
    None
}

/// Whether the decode-attention kernel takes a step of this shape on `device`: one new position per row and a
/// cache it can score in shared memory.
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
pub(crate) fn attends(device: &burn::tensor::Device, new_positions: usize, keys: usize) -> bool {
    new_positions == 1 && keys <= avb_shaders::MAX_KEYS && avb_shaders::on_cube(device)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
pub(crate) fn attends(_device: &burn::tensor::Device, _new_positions: usize, _keys: usize) -> bool {
    false
}

/// The newest position's attention over the KV cache in one kernel (see avb_shaders::decode_attention).
#[cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    q: &Tensor<4>,
    keys: &Tensor<4>,
    values: &Tensor<4>,
    pads: &Tensor<1, burn::tensor::Int>,
    total: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Option<Tensor<4>> {
    avb_shaders::decode_attention(q, keys, values, pads, total, window, scale, softcap)
}

#[cfg(not(any(feature = "wgpu", feature = "webgpu", feature = "cuda")))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    _q: &Tensor<4>,
    _keys: &Tensor<4>,
    _values: &Tensor<4>,
    _pads: &Tensor<1, burn::tensor::Int>,
    _total: usize,
    _window: Option<usize>,
    _scale: f32,
    _softcap: Option<f32>,
) -> Option<Tensor<4>> {
    None
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
