//! Rotate-half RoPE fused with the move of the heads axis: [b, t, heads, hd] (any strides, e.g. a view of a
//! projection's output) to [b, heads, t, hd] contiguous, in one launch instead of about six.

use crate::cube::{from_cube, to_cube};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

const THREADS: u32 = 256;

#[cube(launch)]
fn rope_kernel(x: &Tensor<f32>, cos: &Tensor<f32>, sin: &Tensor<f32>, y: &mut Tensor<f32>) {
    let i = ABSOLUTE_POS;
    let (n, t, hd) = (y.shape(1), y.shape(2), y.shape(3));
    if i >= y.shape(0) * n * t * hd {
        terminate!();
    }
    let d = i % hd;
    let rest = i / hd;
    let p = rest % t;
    let rest = rest / t;
    let h = rest % n;
    let b = rest / n;
    let half = hd / 2;
    let x0 = b * x.stride(0) + p * x.stride(1) + h * x.stride(2);
    let xs = x.stride(3);
    let v = x[x0 + d * xs];
    let rotated = if d < half {
        -x[x0 + (d + half) * xs]
    } else {
        x[x0 + (d - half) * xs]
    };
    let c = b * cos.stride(0) + p * cos.stride(2) + d * cos.stride(3);
    y[i] = v * cos[c] + rotated * sin[c];
}

/// x * cos + rotate_half(x) * sin for `x` [b, t, heads, hd] with tables [b, 1, t, hd], returned as
/// [b, heads, t, hd]; `None` off a CubeCL device.
pub fn rope(x: &BurnTensor<4>, cos: &BurnTensor<4>, sin: &BurnTensor<4>) -> Option<BurnTensor<4>> {
    let [b, t, n, hd] = x.dims();
    if x.dtype() != DType::F32 || hd % 2 != 0 || cos.dims() != [b, 1, t, hd] {
        return None;
    }
    let (xc, cc, sc) = (to_cube(x)?, to_cube(cos)?, to_cube(sin)?);
    let y = empty_device_contiguous_dtype(
        xc.client.clone(),
        xc.device.clone(),
        [b, n, t, hd].into(),
        DType::F32,
    );
    let dim = CubeDim::new_1d(THREADS);
    rope_kernel::launch(
        &y.client,
        calculate_cube_count_elemwise(&y.client, b * n * t * hd, dim),
        dim,
        xc.into_tensor_arg(),
        cc.into_tensor_arg(),
        sc.into_tensor_arg(),
        y.clone().into_tensor_arg(),
    );
    Some(from_cube(y))
}
