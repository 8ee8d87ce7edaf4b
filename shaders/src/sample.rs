//! Temperature + nucleus (top-p) sampling on the device, so that a sampled step, like a greedy one, reads back one
//! id a row and can be recorded, replayed and queued ahead. The tokens kept and the token drawn are those of the
//! host's sampler (`avb_runtime::sample`, transformers' TopPLogitsWarper order: by probability, ties by id, the
//! draw walked from the most likely token down), found without sorting: each is the first token, in ascending
//! order of (logit, id), at which the running probability mass passes a target, and a radix descent finds it
//! 4 bits of that 52-bit key at a time (8 digits of the logit's order-preserving bits, 5 of the id's 20): every
//! pass adds up, per block of the vocabulary, the mass of each of 16 digit values among the tokens that match the
//! digits fixed so far, and the next pass picks the digit at which the target falls. Two descents (the nucleus's
//! edge, then the draw within it) take 27 launches of 128 threads per block of 4096 tokens. Masses are f32 sums in
//! a fixed order (the host adds in f64), so a draw within about 1e-6 of the mass from an edge can fall on the
//! neighbouring token.

use crate::cube::{empty_like, from_cube_int, to_cube};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

const THREADS: u32 = 128;
/// Tokens one cube takes: 32 a thread.
const BLOCK: usize = 4096;
const PER_THREAD: u32 = BLOCK as u32 / THREADS;
const BUCKETS: u32 = 16;
/// Digits of a key: 8 of the logit's 32 ordered bits, then 5 of the id's 20.
const DIGITS: u32 = 13;
const LOGIT_DIGITS: u32 = 8;
const ID_BITS: u32 = 20;
/// Whether `sample_top_p` takes `rows` rows of `vocab` logits: a vocabulary the key's id bits hold, rows within
/// the grid's second axis.
pub fn sample_fits(rows: usize, vocab: usize) -> bool {
    (1..=u16::MAX as usize).contains(&rows) && (1..=1 << ID_BITS).contains(&vocab)
}
/// Launches of a draw: a descent for the nucleus's edge and one for the draw, each pass picking the previous
/// pass's digit and adding up the next one's buckets, and a last pass that only picks.
const PASSES: u32 = 2 * DIGITS + 1;
/// Per row and pass, f32: max logit, total mass, target, mass below the prefix, the edge's mass below it; u32: the
/// prefix's logit and id bits, the edge's.
const STATE_F: usize = 5;
const STATE_U: usize = 4;

/// Bits of `x` whose unsigned order is x's order (-0 taken as +0).
#[cube]
fn ordered_bits(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let bits = if bits == 0x8000_0000u32 { 0u32 } else { bits };
    if bits >= 0x8000_0000u32 {
        !bits
    } else {
        bits | 0x8000_0000u32
    }
}

/// Digit `q` of the key (logit bits, id).
#[cube]
fn key_digit(key: u32, id: u32, q: u32) -> u32 {
    if q < LOGIT_DIGITS {
        (key >> (28 - 4 * q)) & 15
    } else {
        (id >> (16 - 4 * (q - LOGIT_DIGITS))) & 15
    }
}

/// Masks of the key's first `q` digits over (logit bits, id bits).
#[cube]
fn prefix_masks(q: u32) -> (u32, u32) {
    let nh = min(q, LOGIT_DIGITS);
    let nl = q - nh;
    let mh = if nh == 0 {
        0u32
    } else {
        0xFFFF_FFFFu32 << (32 - 4 * nh)
    };
    let ml = if nl == 0 {
        0u32
    } else {
        (0xF_FFFFu32 << (ID_BITS - 4 * nl)) & 0xF_FFFFu32
    };
    (mh, ml)
}

/// Per block of the vocabulary (CUBE_POS_X) and row (CUBE_POS_Y): its largest logit and its mass relative to it,
/// sum of exp((l - max) / T), into stats [rows, blocks, 2].
#[cube(launch)]
fn sample_stats_kernel(logits: &Tensor<f32>, stats: &mut Tensor<f32>, inv_temperature: f32) {
    let (block, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize);
    let n = logits.shape(1);
    let base = row * logits.stride(0);
    let t = UNIT_POS_X as usize;
    let start = block * BLOCK;
    let mut v = Array::<f32>::new(PER_THREAD as usize);
    let mut best = f32::new(-3.0e38);
    #[unroll]
    for u in 0..PER_THREAD {
        let i = start + t + (u * THREADS) as usize;
        v[u as usize] = logits[base + min(i, n - 1)];
        if i < n {
            best = max(best, v[u as usize]);
        }
    }
    let mut shared = Shared::<[f32]>::new_slice(THREADS as usize);
    shared[t] = best;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if t < half {
            shared[t] = max(shared[t], shared[t + half]);
        }
        sync_cube();
        half /= 2;
    }
    let m = shared[0];
    sync_cube();
    let mut mass = 0.0f32;
    #[unroll]
    for u in 0..PER_THREAD {
        let i = start + t + (u * THREADS) as usize;
        if i < n {
            mass += ((v[u as usize] - m) * inv_temperature).exp();
        }
    }
    shared[t] = mass;
    sync_cube();
    half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if t < half {
            shared[t] += shared[t + half];
        }
        sync_cube();
        half /= 2;
    }
    if t == 0 {
        let at = row * stats.stride(0) + block * stats.stride(1);
        stats[at] = m;
        stats[at + 1] = shared[0];
    }
}

/// Pass `pass` of the draw for row CUBE_POS_Y, block CUBE_POS_X: picks the digit the previous pass's buckets
/// place the target in (pass 0 starts the first descent from the blocks' stats), then, before the last pass, adds
/// up this block's mass per value of the next digit among the tokens matching the prefix, into
/// buckets[pass, row, block, 16]. Every block picks alike (the same sums in the same order); block 0 writes the
/// row's state for the next pass, and the last pass writes the drawn id.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sample_pass_kernel(
    logits: &Tensor<f32>,
    stats: &Tensor<f32>,
    units: &Tensor<f32>,
    buckets: &mut Tensor<f32>,
    state_f: &mut Tensor<f32>,
    state_u: &mut Tensor<u32>,
    ids: &mut Tensor<i32>,
    pass: u32,
    inv_temperature: f32,
    cut: f32,
) {
    let (block, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize);
    let t = UNIT_POS_X as usize;
    let blocks = stats.shape(1);
    let mut picked_f = Shared::<[f32]>::new_slice(STATE_F);
    let mut picked_u = Shared::<[u32]>::new_slice(STATE_U);
    let mut totals = Shared::<[f32]>::new_slice(BUCKETS as usize);
    if pass > 0 && t < BUCKETS as usize {
        // The previous pass's mass of digit value t over every block, in block order.
        let mut s = 0.0f32;
        let base = (pass as usize - 1) * buckets.stride(0) + row * buckets.stride(1) + t;
        for b in 0..blocks {
            s += buckets[base + b * buckets.stride(2)];
        }
        totals[t] = s;
    }
    sync_cube();
    if t == 0 {
        let sf = row * state_f.stride(1);
        let su = row * state_u.stride(1);
        let mut m = f32::new(-3.0e38);
        let mut total = 0.0f32;
        // Pass 0's target, the dropped mass, is cut times the total.
        let mut target = cut;
        let mut below = 0.0f32;
        let mut edge_below = 0.0f32;
        let mut prefix_hi = 0u32;
        let mut prefix_lo = 0u32;
        let mut edge_hi = 0u32;
        let mut edge_lo = 0u32;
        if pass == 0 {
            // The row's largest logit and total mass from the blocks', the first target: the dropped mass.
            for b in 0..blocks {
                m = max(m, stats[row * stats.stride(0) + b * stats.stride(1)]);
            }
            for b in 0..blocks {
                let at = row * stats.stride(0) + b * stats.stride(1);
                total += stats[at + 1] * ((stats[at] - m) * inv_temperature).exp();
            }
            target *= total;
        } else {
            let prev = (pass as usize - 1) * state_f.stride(0) + sf;
            let prev_u = (pass as usize - 1) * state_u.stride(0) + su;
            m = state_f[prev];
            total = state_f[prev + 1];
            target = state_f[prev + 2];
            below = state_f[prev + 3];
            edge_below = state_f[prev + 4];
            prefix_hi = state_u[prev_u];
            prefix_lo = state_u[prev_u + 1];
            edge_hi = state_u[prev_u + 2];
            edge_lo = state_u[prev_u + 3];
            // The first digit value whose mass takes the running sum past the target; the last one with mass
            // when rounding leaves the target at or past the total.
            let mut digit = 16u32;
            let mut last = 0u32;
            let mut last_below = below;
            let mut acc = below;
            for b in 0..BUCKETS {
                let mass = totals[b as usize];
                if digit == BUCKETS {
                    if mass > 0.0 {
                        last = b;
                        last_below = acc;
                    }
                    if acc + mass > target && mass > 0.0 {
                        digit = b;
                        below = acc;
                    }
                    acc += mass;
                }
            }
            if digit == BUCKETS {
                digit = last;
                below = last_below;
            }
            let q = (pass - 1) % DIGITS;
            if q < LOGIT_DIGITS {
                prefix_hi |= digit << (28 - 4 * q);
            } else {
                prefix_lo |= digit << (16 - 4 * (q - LOGIT_DIGITS));
            }
            if q == DIGITS - 1 {
                if pass == DIGITS {
                    // The nucleus's edge: the draw's target is the total less u times the kept mass, so that
                    // counting up from the least likely token is counting down from the most likely one.
                    edge_hi = prefix_hi;
                    edge_lo = prefix_lo;
                    edge_below = below;
                    let kept = total - below;
                    target = total - units[row] * kept;
                    below = 0.0;
                    prefix_hi = 0;
                    prefix_lo = 0;
                } else {
                    // Rounding can only move the draw below the edge by a neighbour: the edge is the least
                    // likely token kept.
                    let under =
                        prefix_hi < edge_hi || (prefix_hi == edge_hi && prefix_lo < edge_lo);
                    ids[row] = i32::cast_from(if under { edge_lo } else { prefix_lo });
                }
            }
        }
        picked_f[0] = m;
        picked_f[1] = total;
        picked_f[2] = target;
        picked_f[3] = below;
        picked_f[4] = edge_below;
        picked_u[0] = prefix_hi;
        picked_u[1] = prefix_lo;
        picked_u[2] = edge_hi;
        picked_u[3] = edge_lo;
        if block == 0 && pass + 1 < PASSES {
            let at = pass as usize * state_f.stride(0) + sf;
            let at_u = pass as usize * state_u.stride(0) + su;
            for i in 0..STATE_F {
                state_f[at + i] = picked_f[i];
            }
            for i in 0..STATE_U {
                state_u[at_u + i] = picked_u[i];
            }
        }
    }
    sync_cube();
    if pass + 1 >= PASSES {
        terminate!();
    }
    // This block's mass per value of digit q among the tokens matching the prefix.
    let q = pass % DIGITS;
    let (mh, ml) = prefix_masks(q);
    let (m, prefix_hi, prefix_lo) = (picked_f[0], picked_u[0], picked_u[1]);
    let n = logits.shape(1);
    let base = row * logits.stride(0);
    let start = block * BLOCK;
    let mut acc = Array::<f32>::new(BUCKETS as usize);
    #[unroll]
    for b in 0..BUCKETS {
        acc[b as usize] = 0.0;
    }
    let mut v = Array::<f32>::new(PER_THREAD as usize);
    #[unroll]
    for u in 0..PER_THREAD {
        v[u as usize] = logits[base + min(start + t + (u * THREADS) as usize, n - 1)];
    }
    #[unroll]
    for u in 0..PER_THREAD {
        let i = start + t + (u * THREADS) as usize;
        let key = ordered_bits(v[u as usize]);
        let id = i as u32;
        let matches = i < n && (key & mh) == prefix_hi && (id & ml) == prefix_lo;
        let p = if matches {
            ((v[u as usize] - m) * inv_temperature).exp()
        } else {
            0.0f32
        };
        let d = key_digit(key, id, q);
        #[unroll]
        for b in 0..BUCKETS {
            acc[b as usize] += if d == b { p } else { 0.0f32 };
        }
    }
    // The threads' sums, halved together per digit value.
    let mut sums = Shared::<[f32]>::new_slice((BUCKETS * THREADS) as usize);
    #[unroll]
    for b in 0..BUCKETS {
        sums[b as usize * THREADS as usize + t] = acc[b as usize];
    }
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if t < half {
            #[unroll]
            for b in 0..BUCKETS {
                let at = b as usize * THREADS as usize + t;
                sums[at] += sums[at + half];
            }
        }
        sync_cube();
        half /= 2;
    }
    if t < BUCKETS as usize {
        let at =
            pass as usize * buckets.stride(0) + row * buckets.stride(1) + block * buckets.stride(2);
        buckets[at + t] = sums[t * THREADS as usize];
    }
}

/// One token per row of `logits` [rows, vocab] drawn from the nucleus of softmax(logits / temperature) at the
/// row's `units` [rows] (uniform in [0, 1), the host's draws), as the host's sampler draws it: [rows, 1] ids.
/// `None` off a CubeCL device, for a non-f32 tensor, or shapes past `sample_fits`.
pub fn sample_top_p(
    logits: &BurnTensor<2>,
    units: &BurnTensor<1>,
    temperature: f32,
    top_p: f32,
) -> Option<BurnTensor<2, Int>> {
    let [rows, n] = logits.dims();
    if logits.dtype() != DType::F32
        || units.dtype() != DType::F32
        || units.dims() != [rows]
        || !sample_fits(rows, n)
        || !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0)
    {
        return None;
    }
    let xc = into_contiguous(to_cube(logits)?);
    let uc = into_contiguous(to_cube(units)?);
    let blocks = n.div_ceil(BLOCK);
    let client = xc.client.clone();
    let stats = empty_like(&xc, [rows, blocks, 2], DType::F32);
    let buckets = empty_like(
        &xc,
        [PASSES as usize, rows, blocks, BUCKETS as usize],
        DType::F32,
    );
    let state_f = empty_like(&xc, [PASSES as usize, rows, STATE_F], DType::F32);
    let state_u = empty_like(&xc, [PASSES as usize, rows, STATE_U], DType::U32);
    let ids = empty_like(&xc, [rows], DType::I32);
    let inv_temperature = 1.0 / temperature;
    let dim = CubeDim::new_1d(THREADS);
    sample_stats_kernel::launch(
        &client,
        CubeCount::Static(blocks as u32, rows as u32, 1),
        dim,
        xc.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        inv_temperature,
    );
    for pass in 0..PASSES {
        // The last pass only picks: one cube a row.
        let grid = if pass + 1 == PASSES { 1 } else { blocks };
        sample_pass_kernel::launch(
            &client,
            CubeCount::Static(grid as u32, rows as u32, 1),
            dim,
            xc.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            uc.clone().into_tensor_arg(),
            buckets.clone().into_tensor_arg(),
            state_f.clone().into_tensor_arg(),
            state_u.clone().into_tensor_arg(),
            ids.clone().into_tensor_arg(),
            pass,
            inv_temperature,
            1.0 - top_p,
        );
    }
    Some(from_cube_int::<1>(ids).reshape([rows, 1]))
}
