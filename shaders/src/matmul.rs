//! Batched f32 matrix products in f32. burn's generic matmul on CUDA stages f32 inputs as TF32 (10-bit mantissas,
//! about 2^-11 relative error a product: tokens of a float32 model then differ from transformers'), so on devices
//! that have TF32 the runtime's float products (an f32 model's projections, a prompt's attention) run here instead.

use crate::cube::{empty_like, from_cube, to_cube};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

/// Outputs a cube computes along each side; k is staged in steps of the same size.
const TILE: usize = 16;

/// out[z] = lhs[z] rhs[z'] for 3-D tensors, one 16 x 16 tile of out per cube (z = CUBE_POS_Z; z' = z, or 0 for a
/// shared rhs: `rhs_batch_stride` 0). Each step stages 16 columns of lhs and 16 rows of rhs in shared memory;
/// each output sums its products in order of k.
#[cube(launch)]
fn matmul_f32_kernel(
    lhs: &Tensor<f32>,
    rhs: &Tensor<f32>,
    out: &mut Tensor<f32>,
    rhs_batch_stride: u32,
) {
    let (m, n, k) = (out.shape(1), out.shape(2), lhs.shape(2));
    let z = CUBE_POS_Z as usize;
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let row = CUBE_POS_Y as usize * 16 + ty;
    let col = CUBE_POS_X as usize * 16 + tx;
    let l0 = z * lhs.stride(0) + row * lhs.stride(1);
    let r0 = z * rhs_batch_stride as usize + col * rhs.stride(2);
    let mut a = Shared::<[f32]>::new_slice(256usize);
    let mut b = Shared::<[f32]>::new_slice(256usize);
    let mut acc = 0.0f32;
    let mut k0 = 0usize;
    while k0 < k {
        let mut av = 0.0f32;
        if row < m && k0 + tx < k {
            av = lhs[l0 + (k0 + tx) * lhs.stride(2)];
        }
        let mut bv = 0.0f32;
        if col < n && k0 + ty < k {
            bv = rhs[r0 + (k0 + ty) * rhs.stride(1)];
        }
        a[ty * 16 + tx] = av;
        b[ty * 16 + tx] = bv;
        sync_cube();
        #[unroll]
        for i in 0..16 {
            acc += a[ty * 16 + i] * b[i * 16 + tx];
        }
        sync_cube();
        k0 += 16;
    }
    let o = z * out.stride(0) + row * out.stride(1) + col * out.stride(2);
    if row < m && col < n {
        out[o] = acc;
    }
}

/// lhs [.., m, k] times rhs [.., k, n] (the same leading dimensions, or rhs [k, n] for every batch) in f32, where
/// the device's generic matmul would round f32 to TF32; `None` elsewhere (off a CubeCL device, a device without
/// TF32, other dtypes or shapes), where the caller's generic matmul is exact.
pub fn matmul_f32<const D: usize>(
    lhs: &BurnTensor<D>,
    rhs: &BurnTensor<D>,
) -> Option<BurnTensor<D>> {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    if D < 2 || lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 || ld[D - 1] != rd[D - 2] {
        return None;
    }
    let probe = to_cube(lhs)?;
    let tf32 = ElemType::Float(FloatKind::TF32);
    if !probe.client.properties().supports_type(tf32) {
        return None;
    }
    let (m, k, n) = (ld[D - 2], ld[D - 1], rd[D - 1]);
    let batch: usize = ld[..D - 2].iter().product();
    let shared_rhs = rd[..D - 2].iter().all(|&d| d == 1);
    if !shared_rhs && ld[..D - 2] != rd[..D - 2] {
        return None;
    }
    let rhs_batch = if shared_rhs { 1 } else { batch };
    let lc = to_cube(&lhs.clone().reshape([batch, m, k]))?;
    let rc = to_cube(&rhs.clone().reshape([rhs_batch, k, n]))?;
    if batch == 0 || m == 0 || n == 0 || batch > u16::MAX as usize {
        return None;
    }
    let out = empty_like(&lc, [batch, m, n], DType::F32);
    let rhs_batch_stride = if shared_rhs { 0 } else { rc.meta.strides()[0] };
    matmul_f32_kernel::launch(
        &out.client,
        CubeCount::Static(
            n.div_ceil(TILE) as u32,
            m.div_ceil(TILE) as u32,
            batch as u32,
        ),
        CubeDim::new_2d(TILE as u32, TILE as u32),
        lc.into_tensor_arg(),
        rc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rhs_batch_stride as u32,
    );
    let mut shape = ld;
    shape[D - 1] = n;
    Some(from_cube::<3>(out).reshape(shape))
}
