//! Batched f32 matrix products in f32. burn's generic matmul on CUDA stages f32 inputs as TF32 (10-bit mantissas,
//! about 2^-11 relative error a product: tokens of a float32 model then differ from transformers'), so where it
//! would ([`matmul_rounds_to_tf32`]) the runtime's float products (an f32 model's projections, a prompt's
//! attention) run here instead.

use crate::cube::{empty_like, from_cube, to_cube};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

/// Outputs a cube computes along each side: 16 x 16 threads of 4 x 4 outputs each (the kernel's literals: 64, 16
/// and 4 follow from it).
const TILE: usize = 64;

/// out[z] = lhs[z] rhs[z] for 3-D tensors, one 64 x 64 tile of out per cube (rows along CUBE_POS_X, whose limit is
/// the larger; columns along CUBE_POS_Y; z = CUBE_POS_Z). Each step stages 16 columns of lhs and 16 rows of rhs in
/// shared memory, four loads a thread (adjacent threads on adjacent addresses where the operand is contiguous);
/// each output sums its products in order of k.
#[cube(launch)]
fn matmul_f32_kernel(lhs: &Tensor<f32>, rhs: &Tensor<f32>, out: &mut Tensor<f32>) {
    let (m, n, k) = (out.shape(1), out.shape(2), lhs.shape(2));
    let z = CUBE_POS_Z as usize;
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = ty * 16 + tx;
    let row0 = CUBE_POS_X as usize * 64;
    let col0 = CUBE_POS_Y as usize * 64;
    let l0 = z * lhs.stride(0);
    let r0 = z * rhs.stride(0);
    // a: 64 rows x 16 of k; b: 16 of k x 64 columns.
    let mut a = Shared::<[f32]>::new_slice(1024usize);
    let mut b = Shared::<[f32]>::new_slice(1024usize);
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = 0.0f32;
    }
    let mut k0 = 0usize;
    while k0 < k {
        #[unroll]
        for u in 0..4usize {
            let e = tid + u * 256;
            let (r, ka) = (row0 + e / 16, k0 + e % 16);
            let mut av = 0.0f32;
            if r < m && ka < k {
                av = lhs[l0 + r * lhs.stride(1) + ka * lhs.stride(2)];
            }
            a[e] = av;
            let (kb, c) = (k0 + e / 64, col0 + e % 64);
            let mut bv = 0.0f32;
            if kb < k && c < n {
                bv = rhs[r0 + kb * rhs.stride(1) + c * rhs.stride(2)];
            }
            b[e] = bv;
        }
        sync_cube();
        #[unroll]
        for kk in 0..16usize {
            let mut av = Array::<f32>::new(4usize);
            let mut bv = Array::<f32>::new(4usize);
            #[unroll]
            for i in 0..4usize {
                av[i] = a[(ty * 4 + i) * 16 + kk];
                bv[i] = b[kk * 64 + tx * 4 + i];
            }
            #[unroll]
            for i in 0..4usize {
                #[unroll]
                for j in 0..4usize {
                    acc[i * 4 + j] += av[i] * bv[j];
                }
            }
        }
        sync_cube();
        k0 += 16;
    }
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..4usize {
            let (r, c) = (row0 + ty * 4 + i, col0 + tx * 4 + j);
            let o = z * out.stride(0) + r * out.stride(1) + c * out.stride(2);
            if r < m && c < n {
                out[o] = acc[i * 4 + j];
            }
        }
    }
}

/// Whether burn's generic matmul stages f32 inputs as TF32 on the device of `t`: a CubeCL device with TF32 (CUDA on
/// NVIDIA; wgpu and WebGPU have none).
pub fn matmul_rounds_to_tf32<const D: usize>(t: &BurnTensor<D>) -> bool {
    to_cube(t).is_some_and(|c| {
        c.client
            .properties()
            .supports_type(ElemType::Float(FloatKind::TF32))
    })
}

/// lhs [.., m, k] times rhs [.., k, n] (the same leading dimensions, or rhs [k, n] for every batch) in f32; `None`
/// off a CubeCL device or for other dtypes and shapes. A rhs shared by every batch (a projection's weight) takes the
/// batches as rows of one product, so that the weight is read once per tile of 64 rows, not once per batch.
pub fn matmul_f32<const D: usize>(
    lhs: &BurnTensor<D>,
    rhs: &BurnTensor<D>,
) -> Option<BurnTensor<D>> {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    if D < 2 || lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 || ld[D - 1] != rd[D - 2] {
        return None;
    }
    to_cube(lhs)?;
    let (m, k, n) = (ld[D - 2], ld[D - 1], rd[D - 1]);
    let batch: usize = ld[..D - 2].iter().product();
    let shared_rhs = rd[..D - 2].iter().all(|&d| d == 1);
    let (batch, m) = if shared_rhs {
        (1, batch * m)
    } else {
        (batch, m)
    };
    if (!shared_rhs && ld[..D - 2] != rd[..D - 2])
        || batch == 0
        || m == 0
        || n == 0
        || batch > u16::MAX as usize
        || n.div_ceil(TILE) > u16::MAX as usize
    {
        return None;
    }
    let lc = to_cube(&lhs.clone().reshape([batch, m, k]))?;
    let rc = to_cube(&rhs.clone().reshape([batch, k, n]))?;
    let out = empty_like(&lc, [batch, m, n], DType::F32);
    matmul_f32_kernel::launch(
        &out.client,
        CubeCount::Static(
            m.div_ceil(TILE) as u32,
            n.div_ceil(TILE) as u32,
            batch as u32,
        ),
        CubeDim::new_2d(16, 16),
        lc.into_tensor_arg(),
        rc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    let mut shape = ld;
    shape[D - 1] = n;
    Some(from_cube::<3>(out).reshape(shape))
}
