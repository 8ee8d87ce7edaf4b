//! Embedding rows gathered on the device from token ids on the device: a decoding step then takes no host data
//! (the ids are written in place before it), so it can be recorded once and replayed.

use crate::cube::{empty_like, from_cube, to_cube, to_cube_int};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use cubecl::prelude::*;

const THREADS: u32 = 256;

/// Rows of `out` whose id falls in this part of the table (ids lo..lo + part rows) get that row, times `scale`.
#[cube(launch)]
fn gather_rows_kernel(
    part: &Tensor<f32>,
    ids: &Tensor<i32>,
    out: &mut Tensor<f32>,
    lo: u32,
    scale: f32,
) {
    let row = CUBE_POS_Y as usize;
    let j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let d = out.shape(1);
    let id = ids[row];
    if j >= d || id < i32::cast_from(lo) {
        terminate!();
    }
    let local = u32::cast_from(id) as usize - lo as usize;
    if local < part.shape(0) {
        let o = row * out.stride(0) + j * out.stride(1);
        out[o] = part[local * part.stride(0) + j * part.stride(1)] * scale;
    }
}

/// Rows `ids` [n] (i32, on the device) of a table held in vocabulary ranges (`parts`: each part [rows, d] and the
/// first id it holds), times `scale`: [n, d], one launch per part. Every id must fall in one part (the caller
/// checks ids on the host before writing them); `None` off a CubeCL device or for a non-f32 table.
pub fn gather_rows(
    parts: &[(&BurnTensor<2>, usize)],
    ids: &BurnTensor<1, Int>,
    scale: f32,
) -> Option<BurnTensor<2>> {
    let d = parts.first()?.0.dims()[1];
    let [n] = ids.dims();
    if ids.dtype() != DType::I32
        || n == 0
        || n > u16::MAX as usize
        || parts
            .iter()
            .any(|(p, _)| p.dims()[1] != d || p.dtype() != DType::F32)
    {
        return None;
    }
    let idc = to_cube_int(ids)?;
    let out = empty_like(&idc, [n, d], DType::F32);
    for (part, lo) in parts {
        let pc = to_cube(part)?;
        gather_rows_kernel::launch(
            &out.client,
            CubeCount::Static(d.div_ceil(THREADS as usize) as u32, n as u32, 1),
            CubeDim::new_1d(THREADS),
            pc.into_tensor_arg(),
            idc.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            *lo as u32,
            scale,
        );
    }
    Some(from_cube(out))
}
