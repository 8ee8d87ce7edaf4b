//! Decode-time products y = x W with the runtime's block-quantized weights, read packed from burn's own storage.
//!
//! Layout (the runtime's compact path, burn's Q8S/Q4S with `PackedU32(0)` and blocks of 32 along the last dim):
//! W is [k, out]; `words` [k, out / per_word] packs per_word = 32 / bits consecutive outputs of one input row into
//! a u32, low field first, each field a two's-complement integer; `scales` [k, out / 32] holds one f32 per block.
//! W[i, o] = field(words[i, o / per_word], o % per_word) * scales[i, o / 32].
//!
//! One thread owns one word (per_word adjacent outputs) for up to 8 rows of x, so a warp reads consecutive words
//! of one weight row: coalesced. Parallelism along k comes from chunks (the grid's second axis): each chunk writes
//! partial sums, and a second small kernel adds the chunks (and the bias). More rows (a decoding batch) run as
//! tiles of 8, each reading the weight again: up to `MAX_ROWS` rows that costs less than the f32 copy a generic
//! matmul would make of a 4-bit weight.

use crate::cube::{from_cube, to_cube};
use burn::tensor::quantization::{QuantStore, QuantValue};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

/// Rows of x one launch handles (the accumulators of a thread live in registers: rows x per_word of them).
const TILE_ROWS: usize = 8;
/// Most rows taken through tiles; larger products (prefill) belong to a matmul.
pub const MAX_ROWS: usize = 64;
/// Values per scale along the output dimension.
const BLOCK: usize = 32;
const THREADS: u32 = 256;
/// Threads the grid aims for, so that enough loads are in flight to approach the memory bandwidth.
const TARGET_THREADS: usize = 1 << 16;

#[cube(launch)]
fn qmatvec_kernel(
    x: &Tensor<f32>,
    words: &Tensor<u32>,
    scales: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    row0: u32,
    chunk_len: u32,
    #[comptime] bits: u32,
    #[comptime] rows: u32,
) {
    let per_word = comptime!(32 / bits);
    let word = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let n_words = words.shape(1);
    if word >= n_words {
        terminate!();
    }
    let k_dim = words.shape(0);
    let chunk = CUBE_POS_Y as usize;
    let k0 = chunk * chunk_len as usize;
    let k_end = k0 + chunk_len as usize;
    let k1 = if k_end < k_dim { k_end } else { k_dim };
    let mask = comptime!((1u32 << bits) - 1);
    let half = comptime!(1u32 << (bits - 1));
    let full = comptime!((1u32 << bits) as f32);
    let scale_col = word * per_word as usize / 32;
    let (ws, ss, xs) = (words.stride(0), scales.stride(0), x.stride(0));
    let mut acc = Array::<f32>::new(comptime!((rows * per_word) as usize));
    #[unroll]
    for i in 0..rows * per_word {
        acc[i as usize] = 0.0;
    }
    let mut xv = Array::<f32>::new(comptime!(rows as usize));
    for k in k0..k1 {
        let packed = words[k * ws + word];
        let s = scales[k * ss + scale_col];
        #[unroll]
        for r in 0..rows {
            xv[r as usize] = x[(row0 + r) as usize * xs + k] * s;
        }
        #[unroll]
        for j in 0..per_word {
            let field = (packed >> (j * bits)) & mask;
            let q = if field >= half {
                f32::cast_from(field) - full
            } else {
                f32::cast_from(field)
            };
            #[unroll]
            for r in 0..rows {
                acc[(r * per_word + j) as usize] += xv[r as usize] * q;
            }
        }
    }
    let base = chunk * partial.stride(0) + word * per_word as usize;
    let row_stride = partial.stride(1);
    #[unroll]
    for r in 0..rows {
        #[unroll]
        for j in 0..per_word {
            partial[base + r as usize * row_stride + j as usize] = acc[(r * per_word + j) as usize];
        }
    }
}

/// y[r, o] = sum over chunks of partial[c, r, o] (+ bias[o]).
#[cube(launch)]
fn sum_chunks_kernel(
    partial: &Tensor<f32>,
    bias: &Tensor<f32>,
    y: &mut Tensor<f32>,
    row0: u32,
    #[comptime] has_bias: bool,
) {
    let out = y.shape(1);
    let i = ABSOLUTE_POS;
    if i >= partial.shape(1) * out {
        terminate!();
    }
    let (r, o) = (i / out, i % out);
    let mut s = 0.0f32;
    for c in 0..partial.shape(0) {
        s += partial[c * partial.stride(0) + r * partial.stride(1) + o];
    }
    if has_bias {
        s += bias[o];
    }
    let ys = y.stride(0);
    y[(row0 as usize + r) * ys + o] = s;
}

/// A block-quantized [k, out] weight as the kernels bind it.
pub struct QuantizedWeight {
    words: CubeTensor,
    scales: CubeTensor,
    bits: u32,
    k: usize,
    out: usize,
}

impl QuantizedWeight {
    /// The packed words and scales of `w`, when it is an 8- or 4-bit block-quantized tensor (blocks of 32 along
    /// its last dimension, values packed in u32) on a CubeCL device; `None` otherwise.
    pub fn from_tensor(w: &BurnTensor<2>) -> Option<QuantizedWeight> {
        let DType::QFloat(scheme) = w.dtype() else {
            return None;
        };
        let bits = match scheme.value {
            QuantValue::Q8S => 8,
            QuantValue::Q4S => 4,
            _ => return None,
        };
        if scheme.store != QuantStore::PackedU32(0) {
            return None;
        }
        let [k, out] = w.dims();
        let (words, scales) = to_cube(w)?.quantized_handles()?;
        let per_word = 32 / bits as usize;
        let (ws, ss) = (words.meta.shape(), scales.meta.shape());
        if ws[..] != [k, out / per_word] || ss[..] != [k, out / BLOCK] || out % BLOCK != 0 {
            return None;
        }
        Some(QuantizedWeight {
            words,
            scales,
            bits,
            k,
            out,
        })
    }

    /// x W (+ bias) for x [rows, k] with rows <= MAX_ROWS (in tiles of 8 rows); `None` when x is not an f32 tensor
    /// on the weight's device or has more rows (the caller takes its generic path).
    pub fn matvec(&self, x: &BurnTensor<2>, bias: Option<&BurnTensor<1>>) -> Option<BurnTensor<2>> {
        let [rows, k] = x.dims();
        if rows == 0 || rows > MAX_ROWS || k != self.k || x.dtype() != DType::F32 {
            return None;
        }
        let xc = into_contiguous(to_cube(x)?);
        let bias = match bias {
            Some(b) => Some(to_cube(b)?),
            None => None,
        };
        let client = xc.client.clone();
        let n_words = self.words.meta.shape()[1];
        let tile = rows.min(TILE_ROWS);
        // Enough chunks to fill the device, few enough that the partial sums (written and read back: 8 bytes a
        // value) stay within half the weight's bytes.
        let weight_bytes =
            self.k * self.out * self.bits as usize / 8 + self.k * self.out / BLOCK * 4;
        let chunks = TARGET_THREADS
            .div_ceil(n_words)
            .min(weight_bytes / (2 * 8 * tile * self.out))
            .min(self.k / 32)
            .max(1);
        let chunk_len = self.k.div_ceil(chunks);
        let chunks = self.k.div_ceil(chunk_len);
        let y = empty_device_contiguous_dtype(
            client.clone(),
            xc.device.clone(),
            [rows, self.out].into(),
            DType::F32,
        );
        let partial = empty_device_contiguous_dtype(
            client.clone(),
            xc.device.clone(),
            [chunks, tile, self.out].into(),
            DType::F32,
        );
        for row0 in (0..rows).step_by(tile) {
            let n = tile.min(rows - row0);
            let partial = if n == tile {
                partial.clone()
            } else {
                empty_device_contiguous_dtype(
                    client.clone(),
                    xc.device.clone(),
                    [chunks, n, self.out].into(),
                    DType::F32,
                )
            };
            qmatvec_kernel::launch(
                &client,
                CubeCount::Static(n_words.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
                CubeDim::new_1d(THREADS),
                xc.clone().into_tensor_arg(),
                self.words.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                row0 as u32,
                chunk_len as u32,
                self.bits,
                n as u32,
            );
            let dim = CubeDim::new_1d(THREADS);
            sum_chunks_kernel::launch(
                &client,
                calculate_cube_count_elemwise(&client, n * self.out, dim),
                dim,
                partial.clone().into_tensor_arg(),
                bias.clone().unwrap_or(partial).into_tensor_arg(),
                y.clone().into_tensor_arg(),
                row0 as u32,
                bias.is_some(),
            );
        }
        Some(from_cube(y))
    }
}
