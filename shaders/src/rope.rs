//! Rotate-half RoPE fused with the move of the heads axis: [b, t, heads, hd] (any strides, e.g. a view of a
//! projection's output) to [b, heads, t, hd] contiguous, in one launch instead of about six; and a decoding
//! step's whole q/k/v post-processing (per-head norms, RoPE, KV-cache writes) in one launch.

use crate::cube::{empty_like, from_cube, to_cube, to_cube_int};
use burn::backend::{BackendTensor, DispatchTensorKind};
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::tensor::CubeTensor;
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
    let x0 = b * x.stride(0) + p * x.stride(1) + h * x.stride(2);
    let c = b * cos.stride(0) + p * cos.stride(2) + d * cos.stride(3);
    y[i] = rotated_at(x, x0, x.stride(3), d, hd, cos[c], sin[c]);
}

/// Element d of one head's rotate-half RoPE: x * cos + rotate_half(x) * sin with (cos, sin) of element d's
/// angle, the head's values at x[x0 + j * xs].
#[cube]
fn rotated_at(
    x: &Tensor<f32>,
    x0: usize,
    xs: usize,
    d: usize,
    hd: usize,
    cos: f32,
    sin: f32,
) -> f32 {
    let half = hd / 2;
    let first_half = d < half;
    let partner = if first_half { d + half } else { d - half };
    rotate_pair(x[x0 + d * xs], x[x0 + partner * xs], first_half, cos, sin)
}

/// own * cos + rotate_half * sin, where rotate_half is -other in the first half of the head and other in the second.
#[cube]
fn rotate_pair(own: f32, other: f32, first_half: bool, cos: f32, sin: f32) -> f32 {
    let rotated = if first_half { -other } else { other };
    own * cos + rotated * sin
}

/// Columns `col` and `col2` of row (b, p) of the fused q/k/v projection: read from its output qkv [b, t, width],
/// or, with `from_partial`, added up from its partial sums [chunks, b * t, width] and the bias.
#[cube]
#[allow(clippy::too_many_arguments)]
fn qkv_pair(
    qkv: &Tensor<f32>,
    bias: &Tensor<f32>,
    b: usize,
    p: usize,
    t: usize,
    col: usize,
    col2: usize,
    #[comptime] from_partial: bool,
    #[comptime] has_bias: bool,
) -> (f32, f32) {
    if from_partial {
        let (mut v, mut v2) = crate::qmatvec::chunk_sums(qkv, b * t + p, col, col2, true);
        if has_bias {
            v += bias[col];
            v2 += bias[col2];
        }
        (v, v2)
    } else {
        let x0 = b * qkv.stride(0) + p * qkv.stride(1);
        (
            qkv[x0 + col * qkv.stride(2)],
            qkv[x0 + col2 * qkv.stride(2)],
        )
    }
}

/// 1 / sqrt(mean of squares + eps) of the head at x[x0 + j * xs], j < hd.
#[cube]
fn head_inv_rms(x: &Tensor<f32>, x0: usize, xs: usize, hd: usize, eps: f32) -> f32 {
    let mut sum = 0.0f32;
    for j in 0..hd {
        let v = x[x0 + j * xs];
        sum += v * v;
    }
    1.0 / (sum / f32::cast_from(hd as u32) + eps).sqrt()
}

/// x * cos + rotate_half(x) * sin for `x` [b, t, heads, hd] with tables [b, 1, t, hd], returned as
/// [b, heads, t, hd]; `None` off a CubeCL device.
pub fn rope(x: &BurnTensor<4>, cos: &BurnTensor<4>, sin: &BurnTensor<4>) -> Option<BurnTensor<4>> {
    let [b, t, n, hd] = x.dims();
    if x.dtype() != DType::F32 || hd % 2 != 0 || cos.dims() != [b, 1, t, hd] {
        return None;
    }
    let (xc, cc, sc) = (to_cube(x)?, to_cube(cos)?, to_cube(sin)?);
    let y = empty_like(&xc, [b, n, t, hd], DType::F32);
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

/// One decoding step's q/k/v post-processing in one launch: from the fused projection's output qkv [b, t, q | k | v]
/// (q of `heads` heads, k and v of `kv_heads`), q rotated into q_out [b, heads, t, hd], k rotated and v copied
/// into the caches [b, kv_heads, capacity, hd] at cache indices at..at + t. Three parts of one index space: q's
/// elements, then k's, then v's. Positions come from the device (`cursor`: each row's padding, then `at`) and the
/// angles from a table of every position (`table` [positions, hd]: cos of the hd / 2 frequencies, then their sin),
/// so a step's launch does not change from one position to the next and can be replayed. With `normed`
/// (Gemma-3), each q and k head is RMS-normalised with `q_norm` / `k_norm` before its rotation: every thread of a
/// head computes the head's norm (hd loads from cache), which costs less than the three launches it replaces.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_into_cache_kernel(
    qkv: &Tensor<f32>,
    bias: &Tensor<f32>,
    table: &Tensor<f32>,
    cursor: &Tensor<i32>,
    q_norm: &Tensor<f32>,
    k_norm: &Tensor<f32>,
    q_out: &mut Tensor<f32>,
    keys: &mut Tensor<f32>,
    values: &mut Tensor<f32>,
    eps: f32,
    #[comptime] normed: bool,
    #[comptime] from_partial: bool,
    #[comptime] has_bias: bool,
) {
    let (b_dim, heads, t, hd) = (
        q_out.shape(0),
        q_out.shape(1),
        q_out.shape(2),
        q_out.shape(3),
    );
    let kv_heads = keys.shape(1);
    // One thread per rotation pair (d, d + hd / 2) of a head: both of its outputs from the same two values.
    let half = hd / 2;
    let n_q = b_dim * heads * t * half;
    let n_kv = b_dim * kv_heads * t * half;
    let mut i = ABSOLUTE_POS;
    if i >= n_q + 2 * n_kv {
        terminate!();
    }
    // part 0: q, 1: k, 2: v; `n` heads in the part, starting at column `col0` of qkv.
    let mut part = 0u32;
    let mut n = heads;
    let mut col0 = 0;
    if i >= n_q {
        i -= n_q;
        part = 1;
        n = kv_heads;
        col0 = heads * hd;
        if i >= n_kv {
            i -= n_kv;
            part = 2;
            col0 = (heads + kv_heads) * hd;
        }
    }
    let d = i % half;
    let rest = i / half;
    let p = rest % t;
    let rest = rest / t;
    let h = rest % n;
    let b = rest / n;
    // The cache index of this position, and its RoPE position: the index less the row's padding (0 on padding).
    let index = u32::cast_from(cursor[b_dim]) as usize + p;
    let pad = u32::cast_from(cursor[b]) as usize;
    let mut pos = 0;
    if index > pad {
        pos = index - pad;
    }
    if pos >= table.shape(0) {
        pos = table.shape(0) - 1;
    }
    let angle = pos * table.stride(0) + d * table.stride(1);
    let (cos, sin) = (table[angle], table[angle + half * table.stride(1)]);
    let col = col0 + h * hd;
    let (mut first, mut second) = qkv_pair(
        qkv,
        bias,
        b,
        p,
        t,
        col + d,
        col + d + half,
        from_partial,
        has_bias,
    );
    if part < 2 {
        // Per-head norms read the projection's output (the host passes no partial sums with them).
        if normed {
            let xs = qkv.stride(2);
            let x0 = b * qkv.stride(0) + p * qkv.stride(1) + col * xs;
            let inv_rms = head_inv_rms(qkv, x0, xs, hd, eps);
            let (w1, w2) = if part == 0 {
                (q_norm[d], q_norm[d + half])
            } else {
                (k_norm[d], k_norm[d + half])
            };
            first *= inv_rms * w1;
            second *= inv_rms * w2;
        }
        let rotated = rotate_pair(first, second, true, cos, sin);
        second = rotate_pair(second, first, false, cos, sin);
        first = rotated;
    }
    if part == 0 {
        let o = ((b * heads + h) * t + p) * hd + d;
        q_out[o] = first;
        q_out[o + half] = second;
    } else if index < keys.shape(2) {
        if part == 1 {
            let (o, ds) = (
                b * keys.stride(0) + h * keys.stride(1) + index * keys.stride(2),
                keys.stride(3),
            );
            keys[o + d * ds] = first;
            keys[o + (d + half) * ds] = second;
        } else {
            let (o, ds) = (
                b * values.stride(0) + h * values.stride(1) + index * values.stride(2),
                values.stride(3),
            );
            values[o + d * ds] = first;
            values[o + (d + half) * ds] = second;
        }
    }
}

/// Where `rope_into_cache` reads the fused q/k/v projection from.
#[derive(Clone, Copy)]
pub enum QkvSource<'a> {
    /// Its output, [b, t, width].
    Output(&'a BurnTensor<3>),
    /// Its partial sums over chunks of k, [chunks, b * t, width] (`QuantizedWeight::partial_sums`), and its bias:
    /// the launch that would add them up is folded into this one. Not with per-head norms, whose every thread
    /// would add up a whole head.
    Partial {
        sums: &'a BurnTensor<3>,
        bias: Option<&'a BurnTensor<1>>,
        t: usize,
    },
}

/// The CubeCL tensor under `t`, by value (so that a cache buffer nothing else holds can be written in place).
fn into_cube<const D: usize>(t: BurnTensor<D>) -> Option<CubeTensor> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => Some(c),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// q/k/v of one step from the fused projection's output `qkv` [b, t, (heads + 2 kv_heads) hd]: q rotated and
/// returned as [b, heads, t, hd]; k rotated and v copied into `keys` and `values` [b, kv_heads, capacity, hd], in
/// place, at the cache indices cursor[b]..cursor[b] + t. `cursor` [b + 1] (i32) holds each row's left padding and
/// then that first index: a row's RoPE position is the index less its padding. `table` [positions, hd] holds the
/// cos of the hd / 2 inverse frequencies at every position, then their sin (the halves of rotate-half RoPE share
/// frequencies). The caller keeps cursor[b] + t within the capacity and the positions within the table.
/// `head_norms` (q_norm and k_norm weights [hd], and eps): each q and k head is RMS-normalised before its
/// rotation. Returns (q, keys, values); q is `None`, and the caches come back untouched, when the kernel does not
/// apply (another backend, shapes that do not fit, or a cache buffer shared with another tensor).
pub fn rope_into_cache(
    source: QkvSource<'_>,
    table: &BurnTensor<2>,
    cursor: &BurnTensor<1, Int>,
    heads: usize,
    (keys, values): (BurnTensor<4>, BurnTensor<4>),
    head_norms: Option<(&BurnTensor<1>, &BurnTensor<1>, f32)>,
) -> (Option<BurnTensor<4>>, BurnTensor<4>, BurnTensor<4>) {
    let [kb, kv_heads, _, hd] = keys.dims();
    let (qkv, bias, [b, t, width]) = match source {
        QkvSource::Output(qkv) => (qkv, None, qkv.dims()),
        QkvSource::Partial { sums, bias, t } => {
            let [_, rows, width] = sums.dims();
            if head_norms.is_some() || rows != kb * t {
                return (None, keys, values);
            }
            (sums, bias, [kb, t, width])
        }
    };
    let from_partial = matches!(source, QkvSource::Partial { .. });
    let fits = qkv.dtype() == DType::F32
        && bias.is_none_or(|bias| bias.dims() == [width] && bias.dtype() == DType::F32)
        && keys.dtype() == DType::F32
        && values.dims() == keys.dims()
        && kb == b
        && hd % 2 == 0
        && width == (heads + 2 * kv_heads) * hd
        && table.dims()[1] == hd
        && table.dtype() == DType::F32
        && cursor.dims() == [b + 1]
        && cursor.dtype() == DType::I32
        && head_norms.is_none_or(|(qn, kn, _)| {
            qn.dims() == [hd] && kn.dims() == [hd] && qn.dtype() == DType::F32
        });
    if !fits {
        return (None, keys, values);
    }
    let (Some(qc), Some(tc), Some(cc)) = (to_cube(qkv), to_cube(table), to_cube_int(cursor)) else {
        return (None, keys, values);
    };
    let bias = match bias.map(to_cube) {
        Some(None) => return (None, keys, values),
        Some(b) => b,
        None => None,
    };
    // Without norms the kernel binds the table in their place and never reads it as such.
    let norms = match head_norms {
        Some((qn, kn, eps)) => match (to_cube(qn), to_cube(kn)) {
            (Some(qn), Some(kn)) => Some((qn, kn, eps)),
            _ => return (None, keys, values),
        },
        None => None,
    };
    let (Some(kc), Some(vc)) = (into_cube(keys), into_cube(values)) else {
        unreachable!("the caches live where qkv does");
    };
    if !(kc.can_mut() && vc.can_mut()) {
        return (None, from_cube(kc), from_cube(vc));
    }
    let q = empty_like(&qc, [b, heads, t, hd], DType::F32);
    let dim = CubeDim::new_1d(THREADS);
    rope_into_cache_kernel::launch(
        &q.client,
        calculate_cube_count_elemwise(&q.client, b * (heads + 2 * kv_heads) * t * hd / 2, dim),
        dim,
        qc.into_tensor_arg(),
        // Without a bias the kernel binds the table in its place and never reads it as such.
        bias.clone().unwrap_or(tc.clone()).into_tensor_arg(),
        tc.clone().into_tensor_arg(),
        cc.into_tensor_arg(),
        norms
            .as_ref()
            .map_or(tc.clone(), |n| n.0.clone())
            .into_tensor_arg(),
        norms.as_ref().map_or(tc, |n| n.1.clone()).into_tensor_arg(),
        q.clone().into_tensor_arg(),
        kc.clone().into_tensor_arg(),
        vc.clone().into_tensor_arg(),
        norms.as_ref().map_or(0.0, |n| n.2),
        norms.is_some(),
        from_partial,
        bias.is_some(),
    );
    (Some(from_cube(q)), from_cube(kc), from_cube(vc))
}
