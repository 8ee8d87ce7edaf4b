//! Between burn's dispatch tensors and the CubeCL tensors the kernels bind.

use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

/// The CubeCL tensor under `t` (float or quantized); `None` when `t` lives on another backend.
pub(crate) fn to_cube<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    match t.clone().into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c))
        | DispatchTensorKind::Cube(BackendTensor::Quantized(c)) => Some(c),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// A float CubeCL tensor as a burn tensor.
pub(crate) fn from_cube<const D: usize>(c: CubeTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(c)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// An integer CubeCL tensor as a burn tensor.
pub(crate) fn from_cube_int<const D: usize>(c: CubeTensor) -> Tensor<D, Int> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Int(c)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// The CubeCL tensor under an integer tensor.
pub(crate) fn to_cube_int<const D: usize>(t: &Tensor<D, Int>) -> Option<CubeTensor> {
    match t.clone().into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Int(c)) => Some(c),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// An uninitialised contiguous tensor for a kernel's output, on the client and device of `like`.
pub(crate) fn empty_like(like: &CubeTensor, shape: impl Into<Shape>, dtype: DType) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// Whether `device` runs on CubeCL (where these kernels apply).
pub fn on_cube(device: &burn::tensor::Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
}
