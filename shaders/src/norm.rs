//! RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w over the last dimension, one cube per row; optionally added to a
//! residual in the same launch (Gemma-3's post-norms: residual + norm(sublayer output)).

use crate::cube::{empty_like, from_cube, to_cube};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

/// Threads per row: a power of two (the tree reduction halves it).
const THREADS: u32 = 256;
/// Values a thread loads at once: one at a time, a 3584-wide row waited out 28 memory latencies per pass
/// (22 us a row on the H200, 57 launches a Qwen2.5-7B step). A single row (batch-1 decoding: Gemma-3's post-norms)
/// takes 16, two rounds for Gemma-3-27B's 5376 values instead of six: 1.4% more decode tokens/s at batch 1 on the
/// H200, where 16 for every launch ran 0.99x at batch 64 (Qwen2.5-7B's norms before the products).
const UNROLL: usize = 4;
const ROW_UNROLL: usize = 16;
/// Values a thread loads at once for the sum of squares: a 3584-wide row is one round for the 256 threads of a norm
/// launch and two for the 128 of a single-row product that folds the norm in.
const SUM_UNROLL: usize = 16;

#[cube(launch)]
fn rms_norm_kernel(
    x: &Tensor<f32>,
    weight: &Tensor<f32>,
    residual: &Tensor<f32>,
    y: &mut Tensor<f32>,
    eps: f32,
    #[comptime] threads: u32,
    #[comptime] unroll: usize,
    #[comptime] add_residual: bool,
) {
    let row = CUBE_POS_X as usize;
    let d = x.shape(1);
    let tid = UNIT_POS_X as usize;
    let step = threads as usize;
    let x0 = row * x.stride(0);
    let y0 = row * y.stride(0);
    let r0 = row * residual.stride(0);
    let scale = row_inv_rms(x, x0, d, eps, threads);
    let mut i = tid;
    while i < d {
        let mut v = Array::<f32>::new(unroll);
        let mut w = Array::<f32>::new(unroll);
        let mut r = Array::<f32>::new(unroll);
        #[unroll]
        for u in 0..unroll {
            let j = min(i + u * step, d - 1);
            v[u] = x[x0 + j];
            w[u] = weight[j];
            r[u] = 0.0;
            if add_residual {
                r[u] = residual[r0 + j];
            }
        }
        #[unroll]
        for u in 0..unroll {
            let j = i + u * step;
            if j < d {
                y[y0 + j] = v[u] * scale * w[u] + r[u];
            }
        }
        i += unroll * step;
    }
}

/// 1 / sqrt(mean(x^2) + eps) of the row x[x0..x0 + d], by the whole cube of `threads` threads: interleaved
/// slices with UNROLL loads in flight, then a tree in shared memory (the same order in every cube).
#[cube]
pub(crate) fn row_inv_rms(
    x: &Tensor<f32>,
    x0: usize,
    d: usize,
    eps: f32,
    #[comptime] threads: u32,
) -> f32 {
    let tid = UNIT_POS_X as usize;
    let step = threads as usize;
    let mut sum = 0.0f32;
    let mut i = tid;
    while i < d {
        // Indices past the row read its last value, counted as 0.
        let mut v = Array::<f32>::new(SUM_UNROLL);
        #[unroll]
        for u in 0..SUM_UNROLL {
            v[u] = x[x0 + min(i + u * step, d - 1)];
        }
        #[unroll]
        for u in 0..SUM_UNROLL {
            if i + u * step < d {
                sum += v[u] * v[u];
            }
        }
        i += SUM_UNROLL * step;
    }
    let mut partial = Shared::<[f32]>::new_slice(threads as usize);
    partial[tid] = sum;
    sync_cube();
    // Halved each round: a runtime value (the comptime `threads` would stay constant in the loop).
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if tid < half {
            let sum = partial[tid] + partial[tid + half];
            partial[tid] = sum;
        }
        sync_cube();
        half /= 2;
    }
    1.0f32 / (partial[0] / f32::cast_from(d as u32) + eps).sqrt()
}

/// RMSNorm of every row of `x` ([.., d], f32) with `weight` [d], plus `residual` (x's shape) when given; `None`
/// when `x` is not on a CubeCL device (the caller keeps its generic path).
pub fn rms_norm<const D: usize>(
    x: &BurnTensor<D>,
    weight: &BurnTensor<1>,
    eps: f32,
    residual: Option<&BurnTensor<D>>,
) -> Option<BurnTensor<D>> {
    if x.dtype() != DType::F32
        || residual.is_some_and(|r| r.dims() != x.dims() || r.dtype() != DType::F32)
    {
        return None;
    }
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    // One cube per row along the grid's first axis.
    if rows > u16::MAX as usize {
        return None;
    }
    let flat = |t: &BurnTensor<D>| Some(into_contiguous(to_cube(&t.clone().reshape([rows, d]))?));
    let xc = flat(x)?;
    let wc = to_cube(weight)?;
    // Without a residual the kernel binds x in its place and never reads it as such.
    let rc = match residual {
        Some(r) => flat(r)?,
        None => xc.clone(),
    };
    let y = empty_like(&xc, [rows, d], DType::F32);
    rms_norm_kernel::launch(
        &y.client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        xc.into_tensor_arg(),
        wc.into_tensor_arg(),
        rc.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        eps,
        THREADS,
        if rows == 1 { ROW_UNROLL } else { UNROLL },
        residual.is_some(),
    );
    Some(from_cube::<2>(y).reshape(dims))
}
