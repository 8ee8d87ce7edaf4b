//! Decode attention: one new query per row against the preallocated KV cache, in one launch. Grouped-query
//! heads read their shared KV head in place (no repeat), left padding and a sliding window are masked from the row's
//! padding and the step's position (both read from the device), and Gemma's attention soft-capping is applied to the scores.
//!
//! One cube per (head, row), or for large batches per (KV head, row) with the group of heads sharing it, so that
//! each key and value is read once per row: each thread scores whole keys into shared memory (max and sum by tree
//! reductions), then groups of threads sum the probability-weighted values of interleaved keys, one quad of head
//! dimensions per thread, and the groups' sums are added in shared memory. Keys, values and queries are read as 16-byte quads,
//! several in flight per thread: with 4-byte loads a key's 128-wide dot product waited out 8 rounds of memory
//! latency, and the kernel took 24 us a layer on the H200 at batch 1 (Qwen2.5-7B, 132 keys) against 15 us now.

use crate::cube::{empty_like, from_cube, to_cube, to_cube_int};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

const THREADS: u32 = 256;
/// Quads of a key a thread loads together when scoring (fewer where the head has fewer), and keys' value quads
/// when summing.
const KEY_QUADS: u32 = 16;
const VALUE_KEYS: usize = 8;

type Quad = Vector<f32, Const<4>>;

/// Quads of a key loaded together for head dimension `hd`: the largest of KEY_QUADS, 8, 4, 2, 1 dividing hd / 4.
fn key_unroll(hd: usize) -> u32 {
    let quads = (hd / 4) as u32;
    [KEY_QUADS, 8, 4, 2, 1]
        .into_iter()
        .find(|u| quads % u == 0)
        .unwrap_or(1)
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
        && head_dim % 4 == 0
        && head_dim > 0
        && THREADS as usize % (head_dim / 4) == 0
}
/// Largest cache the kernel scores in shared memory: 8 KiB of scores, within WebGPU's default 16 KiB of
/// workgroup storage. Longer caches take the generic path.
pub const MAX_KEYS: usize = 2048;
/// Fewest cubes (rows x KV heads) for which a cube takes a whole group of heads: about two per multiprocessor of a
/// large GPU (on the H200, Qwen2.5-7B's 4 KV heads at batch 64).
const GROUPED_MIN_CUBES: usize = 256;

/// Shared memory the kernel takes with `heads` heads per cube: their scores, reduction slots and queries, and the
/// value sums' quads.
fn shared_bytes(heads: usize, capacity: usize, head_dim: usize) -> usize {
    4 * (heads * (capacity + THREADS as usize + head_dim) + 4 * THREADS as usize)
}

/// Below any real score: WGSL has no infinity literal.
const MASKED: f32 = -3.0e38;

/// The four lanes of a quad added.
#[cube]
fn quad_sum(v: Quad) -> f32 {
    v.extract(0usize) + v.extract(1usize) + v.extract(2usize) + v.extract(3usize)
}

/// Strides and shapes count floats, indices count quads (every stride but the last is a multiple of 4).
///
/// A cube takes `heads_per_cube` consecutive heads of one row: 1, or the whole group sharing a KV head, which it
/// then reads once instead of once per head (for large batches, where cubes are plenty).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_attention_kernel(
    q: &Tensor<Quad>,
    keys: &Tensor<Quad>,
    values: &Tensor<Quad>,
    cursor: &Tensor<i32>,
    out: &mut Tensor<Quad>,
    window: u32,
    scale: f32,
    softcap: f32,
    #[comptime] capacity: u32,
    #[comptime] threads: u32,
    #[comptime] head_quads: u32,
    #[comptime] key_unroll: u32,
    #[comptime] heads_per_cube: u32,
) {
    let heads = comptime!(heads_per_cube as usize);
    let cap = comptime!(capacity as usize);
    let hq = comptime!(head_quads as usize);
    let nt = comptime!(threads as usize);
    let h0 = CUBE_POS_X as usize * heads;
    let b = CUBE_POS_Y as usize;
    let group = q.shape(1) / keys.shape(1);
    let kh = h0 / group;
    let tid = UNIT_POS_X as usize;
    // The new position's cache index (cursor's last entry), clamped to the cache; keys 0..=last are written.
    let mut last = u32::cast_from(cursor[cursor.shape(0) - 1]) as usize;
    if last >= cap {
        last = cap - 1;
    }
    let n = last + 1;
    let pad = u32::cast_from(cursor[b]) as usize;
    let k0 = (b * keys.stride(0) + kh * keys.stride(1)) / 4;
    let v0 = (b * values.stride(0) + kh * values.stride(1)) / 4;
    let (ks, vs) = (keys.stride(2) / 4, values.stride(2) / 4);
    // Head i's scores at i * capacity, its reduction slots at i * threads, its query at i * head_quads.
    let mut scores = Shared::<[f32]>::new_slice(comptime!(heads * cap));
    let mut red = Shared::<[f32]>::new_slice(comptime!(heads * nt));
    let mut qs = Shared::<[Quad]>::new_slice(comptime!(heads * hq));
    if tid < hq {
        #[unroll]
        for i in 0..heads {
            qs[i * hq + tid] = q[(b * q.stride(0) + (h0 + i) * q.stride(1)) / 4 + tid];
        }
    }
    sync_cube();

    let mut local_max = Array::<f32>::new(heads);
    #[unroll]
    for i in 0..heads {
        local_max[i] = f32::new(MASKED);
    }
    let mut j = tid;
    while j < n {
        let mut s = Array::<f32>::new(heads);
        #[unroll]
        for i in 0..heads {
            s[i] = f32::new(MASKED);
        }
        let in_window = window == 0 || last - j < window as usize;
        if (j >= pad && in_window) || j == last {
            let row = k0 + j * ks;
            let mut dot = Array::<Quad>::new(heads);
            #[unroll]
            for i in 0..heads {
                dot[i] = Quad::empty().fill(0.0);
            }
            #[unroll]
            for d0 in 0..head_quads / key_unroll {
                let mut kv = Array::<Quad>::new(comptime!(key_unroll as usize));
                #[unroll]
                for u in 0..key_unroll {
                    kv[u as usize] = keys[row + (d0 * key_unroll + u) as usize];
                }
                #[unroll]
                for i in 0..heads {
                    #[unroll]
                    for u in 0..key_unroll {
                        dot[i] += qs[i * hq + (d0 * key_unroll + u) as usize] * kv[u as usize];
                    }
                }
            }
            #[unroll]
            for i in 0..heads {
                let mut score = quad_sum(dot[i]) * scale;
                if softcap > 0.0 {
                    score = (score / softcap).tanh() * softcap;
                }
                s[i] = score;
            }
        }
        #[unroll]
        for i in 0..heads {
            scores[i * cap + j] = s[i];
            if s[i] > local_max[i] {
                local_max[i] = s[i];
            }
        }
        j += nt;
    }
    #[unroll]
    for i in 0..heads {
        red[i * nt + tid] = local_max[i];
    }
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if tid < half {
            #[unroll]
            for i in 0..heads {
                let other = red[i * nt + tid + half];
                if other > red[i * nt + tid] {
                    red[i * nt + tid] = other;
                }
            }
        }
        sync_cube();
        half /= 2;
    }
    let mut max = Array::<f32>::new(heads);
    let mut local_sum = Array::<f32>::new(heads);
    #[unroll]
    for i in 0..heads {
        max[i] = red[i * nt];
        local_sum[i] = 0.0;
    }
    sync_cube();

    let mut j = tid;
    while j < n {
        #[unroll]
        for i in 0..heads {
            let s = scores[i * cap + j];
            let e = if s > MASKED {
                (s - max[i]).exp()
            } else {
                0.0f32
            };
            scores[i * cap + j] = e;
            local_sum[i] += e;
        }
        j += nt;
    }
    #[unroll]
    for i in 0..heads {
        red[i * nt + tid] = local_sum[i];
    }
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if tid < half {
            #[unroll]
            for i in 0..heads {
                let sum = red[i * nt + tid] + red[i * nt + tid + half];
                red[i * nt + tid] = sum;
            }
        }
        sync_cube();
        half /= 2;
    }

    // Groups of head_quads threads, one quad of head dimensions each; group g takes keys pad + g,
    // pad + g + groups, ..., VALUE_KEYS of them at a time (the last round's keys past n clamped to n - 1 and
    // weighted 0, so that every load is in bounds and none waits on a branch).
    let groups = comptime!(nt / hq);
    let (g, lane) = (tid / hq, tid % hq);
    let mut partial = Shared::<[Quad]>::new_slice(nt);
    let mut acc = Array::<Quad>::new(heads);
    #[unroll]
    for i in 0..heads {
        acc[i] = Quad::empty().fill(0.0);
    }
    let mut j = pad + g;
    while j < n {
        let mut vv = Array::<Quad>::new(VALUE_KEYS);
        #[unroll]
        for u in 0..VALUE_KEYS {
            let key = j + u * groups;
            let at = if key < n { key } else { n - 1 };
            vv[u] = values[v0 + at * vs + lane];
        }
        #[unroll]
        for u in 0..VALUE_KEYS {
            let key = j + u * groups;
            let at = if key < n { key } else { n - 1 };
            #[unroll]
            for i in 0..heads {
                let p = if key < n {
                    scores[i * cap + at]
                } else {
                    0.0f32
                };
                acc[i] += Quad::empty().fill(p) * vv[u];
            }
        }
        j += VALUE_KEYS * groups;
    }
    #[unroll]
    for i in 0..heads {
        partial[tid] = acc[i];
        sync_cube();
        if tid < hq {
            let mut sum = Quad::empty().fill(0.0);
            for g in 0..groups {
                sum += partial[g * hq + tid];
            }
            let o0 = (b * out.stride(0) + (h0 + i) * out.stride(1)) / 4;
            out[o0 + tid] = sum * Quad::empty().fill(1.0 / red[i * nt]);
        }
        sync_cube();
    }
}

/// Whether `t`'s last dimension is contiguous and its other strides whole quads (the kernel reads it as quads).
fn quad_rows(t: &CubeTensor) -> bool {
    let strides = t.meta.strides();
    strides.last() == Some(&1) && strides.iter().all(|s| *s == 1 || s % 4 == 0)
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
    let qc = into_contiguous(to_cube(&q.clone().reshape([b, heads, hd]))?);
    let (kc, vc, cc) = (to_cube(keys)?, to_cube(values)?, to_cube_int(cursor)?);
    if !quad_rows(&kc) || !quad_rows(&vc) {
        return None;
    }
    let out = empty_like(&qc, [b, heads, hd], DType::F32);
    let group = heads / kv_heads;
    let heads_per_cube = match b * kv_heads >= GROUPED_MIN_CUBES
        && shared_bytes(group, capacity, hd)
            <= out.client.properties().hardware.max_shared_memory_size
    {
        true => group,
        false => 1,
    };
    decode_attention_kernel::launch(
        &out.client,
        CubeCount::Static((heads / heads_per_cube) as u32, b as u32, 1),
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
        (hd / 4) as u32,
        key_unroll(hd),
        heads_per_cube as u32,
    );
    Some(from_cube::<3>(out).reshape([b, heads, 1, hd]))
}
