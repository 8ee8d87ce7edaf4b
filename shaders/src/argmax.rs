//! Greedy decoding's choice on the device: each row's index of its largest logit, so that a step reads back one
//! integer per row.

use crate::cube::{empty_like, from_cube_int, to_cube};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

const THREADS: u32 = 256;

/// Row `CUBE_POS_X`'s index of its largest value, the first among equals (as torch's argmax): the cube's threads
/// scan interleaved slices of the row, keeping their first maximum, then halve the candidates in shared memory,
/// the smaller index winning a tie.
#[cube(launch)]
fn argmax_kernel(x: &Tensor<f32>, out: &mut Tensor<i32>) {
    let row = CUBE_POS_X as usize;
    let n = x.shape(1);
    let base = row * x.stride(0);
    let t = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    // A thread past the row's end holds no candidate: index n loses every comparison that matters.
    let mut best = f32::new(-3.0e38);
    let mut at = n;
    if t < n {
        best = x[base + t];
        at = t;
    }
    let mut i = t + step;
    while i < n {
        let v = x[base + i];
        if v > best {
            best = v;
            at = i;
        }
        i += step;
    }
    let mut values = Shared::<[f32]>::new_slice(THREADS as usize);
    let mut indices = Shared::<[u32]>::new_slice(THREADS as usize);
    values[t] = best;
    indices[t] = at as u32;
    sync_cube();
    let mut half = step / 2;
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
    if t == 0 {
        out[row] = i32::cast_from(indices[0]);
    }
}

/// The index of each row's largest value, [rows, n] -> [rows, 1] (ties to the first, as burn's and torch's
/// argmax), or `None` off a CubeCL device or for a non-f32 tensor.
pub fn argmax(x: &BurnTensor<2>) -> Option<BurnTensor<2, Int>> {
    let [rows, n] = x.dims();
    if x.dtype() != DType::F32 || rows == 0 || n == 0 || n > i32::MAX as usize {
        return None;
    }
    let xc = into_contiguous(to_cube(x)?);
    let out = empty_like(&xc, [rows], DType::I32);
    argmax_kernel::launch(
        &out.client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        xc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    Some(from_cube_int::<1>(out).reshape([rows, 1]))
}
