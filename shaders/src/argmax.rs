//! Greedy decoding's choice on the device: each row's index of its largest logit, so that a step reads back one
//! integer per row. Blocks of each row are scanned by separate cubes, then their candidates reduced.

use crate::cube::{empty_like, from_cube_int, to_cube};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

const THREADS: u32 = 256;
/// Values one cube of the first pass scans: a 152k vocabulary in 38 cubes per row. One cube per row spent
/// 113 us on it on the H200, waiting out a memory latency per 256 values.
const BLOCK: usize = 4096;
/// Values a thread loads at once.
const UNROLL: usize = 4;

/// Halve (value, index) candidates in shared memory down to slot 0: the larger value wins, the smaller index a tie.
#[cube]
fn keep_first_max(values: &mut Shared<[f32]>, indices: &mut Shared<[u32]>, t: usize) {
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if t < half {
            let (v, i) = (values[t + half], indices[t + half]);
            if v > values[t] || (v == values[t] && i < indices[t]) {
                values[t] = v;
                indices[t] = i;
            }
        }
        sync_cube();
        half /= 2;
    }
}

/// First pass: the first maximum of block CUBE_POS_X of row CUBE_POS_Y (values [block * BLOCK, +BLOCK) of the row),
/// into `values` / `indices` [rows, blocks]. A thread past the row's end holds no candidate: index n loses every
/// comparison that matters.
#[cube(launch)]
fn argmax_blocks_kernel(x: &Tensor<f32>, values: &mut Tensor<f32>, indices: &mut Tensor<u32>) {
    let (block, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize);
    let n = x.shape(1);
    let base = row * x.stride(0);
    let t = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let start = block * BLOCK;
    let end = min(start + BLOCK, n);
    let mut best = f32::new(-3.0e38);
    let mut at = n;
    let mut i = start + t;
    while i < end {
        let mut v = Array::<f32>::new(UNROLL);
        #[unroll]
        for u in 0..UNROLL {
            v[u] = x[base + min(i + u * step, end - 1)];
        }
        #[unroll]
        for u in 0..UNROLL {
            // Strictly greater: a thread's later indices never win a tie.
            if i + u * step < end && (v[u] > best || at == n) {
                best = v[u];
                at = i + u * step;
            }
        }
        i += UNROLL * step;
    }
    let mut shared_values = Shared::<[f32]>::new_slice(THREADS as usize);
    let mut shared_indices = Shared::<[u32]>::new_slice(THREADS as usize);
    shared_values[t] = best;
    shared_indices[t] = at as u32;
    keep_first_max(&mut shared_values, &mut shared_indices, t);
    if t == 0 {
        let (vo, io) = (
            row * values.stride(0) + block,
            row * indices.stride(0) + block,
        );
        values[vo] = shared_values[0];
        indices[io] = shared_indices[0];
    }
}

/// Second pass: row CUBE_POS_X's first maximum over its blocks' candidates.
#[cube(launch)]
fn argmax_final_kernel(values: &Tensor<f32>, indices: &Tensor<u32>, out: &mut Tensor<i32>) {
    let row = CUBE_POS_X as usize;
    let blocks = values.shape(1);
    let t = UNIT_POS_X as usize;
    let (v0, i0) = (row * values.stride(0), row * indices.stride(0));
    // Every thread starts from block 0's candidate (a real one), so threads past the blocks hold one too.
    let mut best = values[v0];
    let mut at = indices[i0];
    let mut b = t;
    while b < blocks {
        let (v, i) = (values[v0 + b], indices[i0 + b]);
        if v > best || (v == best && i < at) {
            best = v;
            at = i;
        }
        b += CUBE_DIM_X as usize;
    }
    let mut shared_values = Shared::<[f32]>::new_slice(THREADS as usize);
    let mut shared_indices = Shared::<[u32]>::new_slice(THREADS as usize);
    shared_values[t] = best;
    shared_indices[t] = at;
    keep_first_max(&mut shared_values, &mut shared_indices, t);
    if t == 0 {
        out[row] = i32::cast_from(shared_indices[0]);
    }
}

/// The index of each row's largest value, [rows, n] -> [rows, 1] (ties to the first, as burn's and torch's
/// argmax), or `None` off a CubeCL device or for a non-f32 tensor. Two launches: blocks of each row, then the
/// blocks' candidates.
pub fn argmax(x: &BurnTensor<2>) -> Option<BurnTensor<2, Int>> {
    let [rows, n] = x.dims();
    let blocks = n.div_ceil(BLOCK);
    if x.dtype() != DType::F32
        || rows == 0
        || n == 0
        || n > i32::MAX as usize
        || rows > u16::MAX as usize
    {
        return None;
    }
    let xc = into_contiguous(to_cube(x)?);
    let values = empty_like(&xc, [rows, blocks], DType::F32);
    let indices = empty_like(&xc, [rows, blocks], DType::U32);
    let out = empty_like(&xc, [rows], DType::I32);
    argmax_blocks_kernel::launch(
        &out.client,
        CubeCount::Static(blocks as u32, rows as u32, 1),
        CubeDim::new_1d(THREADS),
        xc.into_tensor_arg(),
        values.clone().into_tensor_arg(),
        indices.clone().into_tensor_arg(),
    );
    argmax_final_kernel::launch(
        &out.client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        values.into_tensor_arg(),
        indices.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    Some(from_cube_int::<1>(out).reshape([rows, 1]))
}
