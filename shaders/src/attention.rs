//! Decode attention: one new query per row against the preallocated KV cache, in one launch. Grouped-query
//! heads read their shared KV head in place (no repeat), left padding and a sliding window are masked from the row's
//! padding and the step's position (both read from the device), and Gemma's attention soft-capping is applied to the scores.
//!
//! One cube per (head, row): threads score the keys into shared memory (max and sum by tree reductions), then
//! groups of threads sum the probability-weighted values of interleaved keys, one head dimension per thread, and
//! the groups' sums are added in shared memory. Both loops keep 4 loads in flight per thread: with one at a time
//! (and one thread per dimension) the kernel spent most of its time waiting on memory.

use crate::cube::{empty_like, from_cube, to_cube, to_cube_int};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

const THREADS: u32 = 256;
/// Loads a thread issues together in the scoring and value loops where the head dimension allows (else 4): with 4,
/// a key's 128-wide dot product waited out 32 memory latencies (27 us a layer on the H200 at batch 1).
const UNROLL: usize = 16;

/// The loads in flight for head dimension `hd`, or `None` where the kernel does not take it.
fn unroll_for(hd: usize) -> Option<usize> {
    [UNROLL, 4].into_iter().find(|u| hd % u == 0)
}

/// Whether the kernel takes a cache of these dimensions (the same checks `decode_attention` makes of its tensors):
/// so that a caller can know before a step that no part of it falls back to generic ops.
pub fn decode_attention_fits(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
) -> bool {
    capacity <= MAX_KEYS
        && kv_heads > 0
        && heads % kv_heads == 0
        && unroll_for(head_dim).is_some()
        && (head_dim >= THREADS as usize || THREADS as usize % head_dim == 0)
}
/// Largest cache the kernel scores in shared memory: 8 KiB of scores, within WebGPU's default 16 KiB of
/// workgroup storage. Longer caches take the generic path.
pub const MAX_KEYS: usize = 2048;
/// Below any real score: WGSL has no infinity literal.
const MASKED: f32 = -3.0e38;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_attention_kernel(
    q: &Tensor<f32>,
    keys: &Tensor<f32>,
    values: &Tensor<f32>,
    cursor: &Tensor<i32>,
    out: &mut Tensor<f32>,
    window: u32,
    scale: f32,
    softcap: f32,
    #[comptime] capacity: u32,
    #[comptime] threads: u32,
    #[comptime] head_dim: u32,
    #[comptime] unroll: usize,
) {
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let group = q.shape(1) / keys.shape(1);
    let kh = h / group;
    let hd = q.shape(2);
    let tid = UNIT_POS_X as usize;
    let step = threads as usize;
    // The new position's cache index (cursor's last entry), clamped to the cache; keys 0..=last are written.
    let mut last = u32::cast_from(cursor[cursor.shape(0) - 1]) as usize;
    if last >= capacity as usize {
        last = capacity as usize - 1;
    }
    let n = last + 1;
    let pad = u32::cast_from(cursor[b]) as usize;
    let q0 = b * q.stride(0) + h * q.stride(1);
    let k0 = b * keys.stride(0) + kh * keys.stride(1);
    let v0 = b * values.stride(0) + kh * values.stride(1);
    let mut scores = Shared::<[f32]>::new_slice(capacity as usize);
    let mut red = Shared::<[f32]>::new_slice(threads as usize);
    let mut qs = Shared::<[f32]>::new_slice(head_dim as usize);
    let mut d = tid;
    while d < hd {
        qs[d] = q[q0 + d * q.stride(2)];
        d += step;
    }
    sync_cube();

    let (ks, kd) = (keys.stride(2), keys.stride(3));
    let mut local_max = f32::new(MASKED);
    let mut j = tid;
    while j < n {
        let mut s = f32::new(MASKED);
        let in_window = window == 0 || last - j < window as usize;
        if (j >= pad && in_window) || j == last {
            let row = k0 + j * ks;
            let mut dot = 0.0f32;
            let mut d = 0;
            while d < hd {
                let mut kv = Array::<f32>::new(unroll);
                #[unroll]
                for u in 0..unroll {
                    kv[u] = keys[row + (d + u) * kd];
                }
                #[unroll]
                for u in 0..unroll {
                    dot += qs[d + u] * kv[u];
                }
                d += unroll;
            }
            s = dot * scale;
            if softcap > 0.0 {
                s = (s / softcap).tanh() * softcap;
            }
        }
        scores[j] = s;
        if s > local_max {
            local_max = s;
        }
        j += step;
    }
    red[tid] = local_max;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if tid < half {
            let other = red[tid + half];
            if other > red[tid] {
                red[tid] = other;
            }
        }
        sync_cube();
        half /= 2;
    }
    let max = red[0];
    sync_cube();

    let mut local_sum = 0.0f32;
    let mut j = tid;
    while j < n {
        let s = scores[j];
        let e = if s > MASKED { (s - max).exp() } else { 0.0f32 };
        scores[j] = e;
        local_sum += e;
        j += step;
    }
    red[tid] = local_sum;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if tid < half {
            let sum = red[tid] + red[tid + half];
            red[tid] = sum;
        }
        sync_cube();
        half /= 2;
    }
    let denom = red[0];
    sync_cube();

    // Groups of `lanes` threads, one head dimension each; group g takes keys pad + g, pad + g + groups, ...
    let lanes = if hd < step { hd } else { step };
    let groups = step / lanes;
    let (g, lane) = (tid / lanes, tid % lanes);
    let (vs, vd) = (values.stride(2), values.stride(3));
    let mut partial = Shared::<[f32]>::new_slice(comptime!(if threads > head_dim {
        threads
    } else {
        head_dim
    }) as usize);
    if g < groups {
        let mut d = lane;
        while d < hd {
            let mut acc = 0.0f32;
            let mut j = pad + g;
            while j + (unroll - 1) * groups < n {
                let mut vv = Array::<f32>::new(unroll);
                #[unroll]
                for u in 0..unroll {
                    vv[u] = values[v0 + (j + u * groups) * vs + d * vd];
                }
                #[unroll]
                for u in 0..unroll {
                    acc += scores[j + u * groups] * vv[u];
                }
                j += unroll * groups;
            }
            while j < n {
                acc += scores[j] * values[v0 + j * vs + d * vd];
                j += groups;
            }
            partial[g * hd + d] = acc;
            d += lanes;
        }
    }
    sync_cube();
    let o0 = b * out.stride(0) + h * out.stride(1);
    let od = out.stride(2);
    let mut d = tid;
    while d < hd {
        let mut acc = 0.0f32;
        for g in 0..groups {
            acc += partial[g * hd + d];
        }
        out[o0 + d * od] = acc / denom;
        d += step;
    }
}

/// Attention of the newest position: `q` [b, heads, 1, hd] against the caches `keys` / `values`
/// [b, kv_heads, capacity, hd], whose new position sits at cache index cursor[b] (`cursor` [b + 1], i32: each row's
/// left padding, then that index; on the device, so that one launch serves every step). Row r sees the indices
/// cursor[r]..=cursor[b] (only the last `window` of them when given); scores are scaled by `scale` and
/// soft-capped at `softcap` when given. Returns [b, heads, 1, hd], or `None` off a CubeCL device or past the
/// kernel's limits.
pub fn decode_attention(
    q: &BurnTensor<4>,
    (keys, values): (&BurnTensor<4>, &BurnTensor<4>),
    cursor: &BurnTensor<1, Int>,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Option<BurnTensor<4>> {
    let [b, heads, t, hd] = q.dims();
    let [_, kv_heads, capacity, _] = keys.dims();
    if t != 1
        || !decode_attention_fits(heads, kv_heads, hd, capacity)
        || cursor.dims() != [b + 1]
        || q.dtype() != DType::F32
        || cursor.dtype() != DType::I32
    {
        return None;
    }
    let unroll = unroll_for(hd)?;
    let qc = into_contiguous(to_cube(&q.clone().reshape([b, heads, hd]))?);
    let (kc, vc, cc) = (to_cube(keys)?, to_cube(values)?, to_cube_int(cursor)?);
    let out = empty_like(&qc, [b, heads, hd], DType::F32);
    decode_attention_kernel::launch(
        &out.client,
        CubeCount::Static(heads as u32, b as u32, 1),
        CubeDim::new_1d(THREADS),
        qc.into_tensor_arg(),
        kc.into_tensor_arg(),
        vc.into_tensor_arg(),
        cc.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        window.unwrap_or(0) as u32,
        scale,
        softcap.unwrap_or(0.0),
        capacity as u32,
        THREADS,
        hd as u32,
        unroll,
    );
    Some(from_cube::<3>(out).reshape([b, heads, 1, hd]))
}
