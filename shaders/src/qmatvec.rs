//! Decode-time products y = x W with the runtime's block-quantized weights, read packed from burn's own storage.
//!
//! Layout (the runtime's compact path, burn's Q8S/Q4S with `PackedU32(0)` and blocks of 32 along the last dim):
//! W is [k, out]; `words` [k, out / per_word] packs per_word = 32 / bits consecutive outputs of one input row into
//! a u32, low field first, each field a two's-complement integer; `scales` [k, out / 32] holds one f32 per block.
//! W[i, o] = field(words[i, o / per_word], o % per_word) * scales[i, o / 32].
//!
//! A single row (batch-1 decoding): each thread reads 16-byte quads of adjacent words, a cube's threads split a
//! chunk of k into interleaved slices and add the slices up in shared memory (`qmatvec_row_kernel`); chunks of k
//! spread the rows over about a thousand cubes so that each thread loads only a few rows, and a second small
//! kernel adds the chunks (or the kernel that reads the product adds them itself: `partial_sums`, which the RoPE
//! launch of a fused q/k/v projection takes).
//!
//! Up to 8 rows: one thread owns one word (per_word adjacent outputs) for every row of x, so a warp reads
//! consecutive words of one weight row: coalesced. Parallelism along k comes from chunks (the grid's second axis):
//! each chunk writes partial sums, and a second small kernel adds the chunks, the bias and the epilogue.
//!
//! More rows (batched decoding, prefill): a tiled kernel stages a block of x and the matching weight rows,
//! dequantized once, in shared memory, and each thread multiplies a register block of rows by outputs from there
//! (`qmatmul_tile_kernel`); it writes the same partial sums, summed by the same second kernel. Prefill thus reads
//! the packed weights as decoding does, with no dequantized copy.
//!
//! Epilogues: the residual add, or a gated MLP's activation and product when W holds gate and up side by side.

use crate::cube::{empty_like, from_cube, to_cube};
use burn::tensor::quantization::{QuantStore, QuantValue};
use burn::tensor::{DType, Tensor as BurnTensor};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::ir::{features::MmaConfig, ElemType, FloatKind};
use cubecl::prelude::*;
use half::f16;

/// Most rows the matvec kernel takes (its accumulators live in registers: rows x per_word of them per thread).
const MATVEC_ROWS: usize = 8;
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
    let k1 = chunk_end(k0, chunk_len, k_dim);
    let scale_col = word * per_word as usize / 32;
    let (ws, ss, xs) = (words.stride(0), scales.stride(0), x.stride(0));
    let mut acc = Array::<f32>::new(comptime!((rows * per_word) as usize));
    #[unroll]
    for i in 0..rows * per_word {
        acc[i as usize] = 0.0;
    }
    // ROW_UNROLL rows of k per round, their words and scales loaded together: a thread keeps several loads in
    // flight instead of waiting out the memory latency for each.
    let mut k = k0;
    while k + (ROW_UNROLL as usize) <= k1 {
        let mut packed = Array::<u32>::new(comptime!(ROW_UNROLL as usize));
        let mut s = Array::<f32>::new(comptime!(ROW_UNROLL as usize));
        #[unroll]
        for u in 0..ROW_UNROLL {
            packed[u as usize] = words[(k + u as usize) * ws + word];
            s[u as usize] = scales[(k + u as usize) * ss + scale_col];
        }
        #[unroll]
        for u in 0..ROW_UNROLL {
            accumulate_rows(
                &mut acc,
                x,
                xs,
                k + u as usize,
                packed[u as usize],
                s[u as usize],
                bits,
                rows,
            );
        }
        k += ROW_UNROLL as usize;
    }
    while k < k1 {
        let (packed, s) = (words[k * ws + word], scales[k * ss + scale_col]);
        accumulate_rows(&mut acc, x, xs, k, packed, s, bits, rows);
        k += 1;
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

/// Outputs of one cube's tile in the tiled kernel.
const GEMM_TN: u32 = 256;
/// Rows of k the tiled kernel stages per step: a tile of 64 rows then takes 11 KiB of workgroup memory, within
/// WebGPU's default 16 KiB. On the H200 16 rows (21 KiB) ran no faster.
const GEMM_DEPTH: u32 = 8;
/// Cubes the tiled kernel aims for, splitting k into chunks to get there: about two waves of a large GPU's
/// multiprocessors at 256 threads of ~100 registers each (on the H200, batches of 16 and 64: 256 decoded 0.83x as
/// fast, 1024 within 2%; on tensor cores at batch 64, 264 cubes 0.97x, 1024 0.92x, 2048 0.82x).
const GEMM_TARGET_CUBES: usize = 512;
/// Fewest rows of k a chunk takes: a cube that stages only a few steps costs more in setup and partial sums than
/// it computes (on a CPU-emulated GPU, lavapipe or SwiftShader, such cubes made a 40-token prefill of a 135M model
/// take 37 s).
const GEMM_MIN_K: usize = 256;

type Quad = Vector<f32, Const<4>>;

/// Partial sums of x W over one chunk of k (the grid's second axis) for a tile of `tile_rows` rows (16, 32 or 64;
/// the grid's third axis) by GEMM_TN outputs.
///
/// Per step the cube stages GEMM_DEPTH columns of x and the matching weight rows, dequantized once, in shared memory
/// as quads (4 floats); each thread then multiplies a register block of rows by outputs from there (8 x 8 for 32
/// or 64 rows, 4 x 4 for 16). Every run of 32 threads covers 4 thread rows by 8 thread columns, so that each quad
/// load is either broadcast or part of 128 contiguous bytes and serves 16-32 multiply-adds: with one row by four
/// outputs per thread the kernel was bound by shared-memory loads. The next step's words, scales and x are loaded
/// into registers before this step's products, hiding their latency behind them.
///
/// Writes `partial` like `qmatvec_kernel`; the chunk-summing pass adds the bias and the epilogue.
#[cube(launch)]
fn qmatmul_tile_kernel(
    x: &Tensor<f32>,
    words: &Tensor<u32>,
    scales: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    chunk_len: u32,
    #[comptime] bits: u32,
    #[comptime] tile_rows: u32,
) {
    let per_word = comptime!(32 / bits);
    let rows_per_thread = comptime!(if tile_rows >= 32 { 8u32 } else { 4u32 });
    let thread_rows = comptime!(tile_rows / rows_per_thread);
    let thread_cols = comptime!(THREADS / thread_rows);
    // A thread's outputs: `groups` quads of adjacent columns, thread_cols quads apart.
    let groups = comptime!((GEMM_TN / thread_cols / 4) as usize);
    let row_quads = comptime!((rows_per_thread / 4) as usize);
    let cols_per_thread = comptime!(groups * 4);
    // Quads of x per step of k, one more than the tile's rows take so that the staging writes of adjacent k
    // fall in different banks.
    let x_stride = comptime!(tile_rows / 4 + 1);
    let w_stride = comptime!(GEMM_TN / 4);
    let words_per_row = comptime!(GEMM_TN / per_word);
    let word_passes = comptime!((GEMM_DEPTH * words_per_row / THREADS) as usize);
    let word_quads = comptime!((per_word / 4) as usize);
    let x_quads = comptime!(GEMM_DEPTH * tile_rows / 4);

    let (run, lane) = (UNIT_POS_X / 32, UNIT_POS_X % 32);
    let runs_across = comptime!(thread_cols / 8);
    let tr = (run / runs_across) * 4 + lane / 8;
    let tc = (run % runs_across) * 8 + lane % 8;

    let n_rows = x.shape(0);
    let row0 = CUBE_POS_Z as usize * tile_rows as usize;
    let (k_dim, n_words) = (words.shape(0), words.shape(1));
    let out_dim = n_words * per_word as usize;
    let o0 = (CUBE_POS_X * GEMM_TN) as usize;
    let k_start = CUBE_POS_Y as usize * chunk_len as usize;
    let k_end = chunk_end(k_start, chunk_len, k_dim);

    // What this thread stages: x quad (kk, rq) = rows rq*4.. at k0 + kk, and word w of weight row k0 + kk.
    let (x_kk, x_rq) = (UNIT_POS_X % GEMM_DEPTH, UNIT_POS_X / GEMM_DEPTH);
    let mut xv = Array::<f32>::new(4usize);
    let mut packed = Array::<u32>::new(word_passes);
    let mut s = Array::<f32>::new(word_passes);
    stage_loads(
        x,
        words,
        scales,
        &mut xv,
        &mut packed,
        &mut s,
        k_start,
        k_end,
        row0,
        o0,
        x_kk,
        x_rq,
        bits,
        tile_rows,
    );

    let mut xs = Shared::<[Quad]>::new_slice(comptime!((GEMM_DEPTH * x_stride) as usize));
    let mut wsh = Shared::<[Quad]>::new_slice(comptime!((GEMM_DEPTH * w_stride) as usize));
    let mut acc = Array::<f32>::new(comptime!(row_quads * 4 * cols_per_thread));
    #[unroll]
    for i in 0..row_quads * 4 * cols_per_thread {
        acc[i] = 0.0;
    }
    let mut a = Array::<Quad>::new(row_quads);
    let mut b = Array::<Quad>::new(groups);
    let mut k0 = k_start;
    while k0 < k_end {
        if UNIT_POS_X < x_quads {
            let mut q = Quad::empty();
            #[unroll]
            for j in 0..4usize {
                q.insert(j, xv[j]);
            }
            xs[(x_kk * x_stride + x_rq) as usize] = q;
        }
        #[unroll]
        for p in 0..word_passes {
            let idx = UNIT_POS_X + p as u32 * THREADS;
            let (kk, w) = (idx / words_per_row, idx % words_per_row);
            #[unroll]
            for wq in 0..word_quads {
                let mut q = Quad::empty();
                #[unroll]
                for j in 0..4usize {
                    let field = comptime!((wq * 4 + j) as u32);
                    q.insert(j, field_value(packed[p], field, bits) * s[p]);
                }
                wsh[(kk * w_stride) as usize + w as usize * word_quads + wq] = q;
            }
        }
        sync_cube();
        // The next step's loads. (One call site for both loads, in a loop whose first pass only loads, ran 0.78x
        // as fast at batch 16 and 0.92x at 64 on the H200.)
        if k0 + (GEMM_DEPTH as usize) < k_end {
            stage_loads(
                x,
                words,
                scales,
                &mut xv,
                &mut packed,
                &mut s,
                k0 + GEMM_DEPTH as usize,
                k_end,
                row0,
                o0,
                x_kk,
                x_rq,
                bits,
                tile_rows,
            );
        }
        #[unroll]
        for kk in 0..GEMM_DEPTH {
            #[unroll]
            for rq in 0..row_quads {
                a[rq] = xs[(kk * x_stride) as usize + tr as usize * row_quads + rq];
            }
            #[unroll]
            for g in 0..groups {
                b[g] = wsh[(kk * w_stride + tc) as usize + g * thread_cols as usize];
            }
            #[unroll]
            for rq in 0..row_quads {
                #[unroll]
                for i in 0..4usize {
                    let av = a[rq].extract(i);
                    #[unroll]
                    for g in 0..groups {
                        #[unroll]
                        for j in 0..4usize {
                            let at = (rq * 4 + i) * cols_per_thread + g * 4 + j;
                            acc[at] += av * b[g].extract(j);
                        }
                    }
                }
            }
        }
        sync_cube();
        k0 += GEMM_DEPTH as usize;
    }
    let (base, row_stride) = (CUBE_POS_Y as usize * partial.stride(0), partial.stride(1));
    #[unroll]
    for r in 0..row_quads * 4 {
        let row = row0 + tr as usize * row_quads * 4 + r;
        if row < n_rows {
            #[unroll]
            for g in 0..groups {
                #[unroll]
                for j in 0..4usize {
                    let o = o0 + (g * thread_cols as usize + tc as usize) * 4 + j;
                    if o < out_dim {
                        partial[base + row * row_stride + o] = acc[r * cols_per_thread + g * 4 + j];
                    }
                }
            }
        }
    }
}

/// Outputs of one cube's tile in the tensor-core kernel, and rows of k it stages per step.
const MMA_TN: u32 = 256;
/// The tensor cores' fragment: 16 x 16 x 16, f16 inputs, f32 accumulators.
const FRAG: u32 = 16;
const F16_MAX: f32 = 65504.0;
/// Shared-memory row stride of the staged weight tile, in f16 (and of the x tile, past its depth): 8 more than the
/// tile's width, so that the fragment loads' 16 rows start in different banks.
const MMA_W_STRIDE: u32 = MMA_TN + 8;
const MMA_PAD: u32 = 8;

/// Rows of k the tensor-core kernel stages per step: 64 for tiles of 16 or 32 rows (half the steps, and syncs, of
/// 32), 32 for 64 and 128 rows, where 64 would take the kernel's shared memory past 48 KiB (Vulkan's usual limit).
const fn mma_depth(tile_rows: u32) -> u32 {
    if tile_rows >= 64 {
        32
    } else {
        64
    }
}

/// Rows of the tiles a product of `rows` rows runs in: 16, 32 or 64 in the f32 tiled kernel (its register blocks),
/// up to 128 on tensor cores, where a plane's 64 x 64 outputs load 8 fragments per 16 products (6 per 8 at 64 rows)
/// and each dequantized weight serves twice the rows.
fn tile_rows(rows: usize, tensor_cores: bool) -> usize {
    rows.next_power_of_two()
        .clamp(16, if tensor_cores { 128 } else { 64 })
}

/// Bytes of shared memory the tensor-core kernel takes for a tile of `tile_rows`: the x and weight tiles in f16 and
/// the planes' 16 x 16 f32 output staging.
const fn mma_shared_bytes(tile_rows: u32) -> usize {
    let depth = mma_depth(tile_rows);
    let f16_values = tile_rows * (depth + MMA_PAD) + depth * MMA_W_STRIDE;
    (2 * f16_values + 4 * (THREADS / 32) * FRAG * FRAG) as usize
}

/// The bits that flip a word's two's-complement fields to unsigned ones (field + 2^(bits-1)).
const fn field_sign_bits(bits: u32) -> u32 {
    if bits == 4 {
        0x8888_8888
    } else {
        0x8080_8080
    }
}

/// What an unsigned field u reads as in `f16_field_pair`'s halves (1024 + u), less the sign flip's 2^(bits-1): the
/// field's value once subtracted.
const fn f16_field_bias(bits: u32) -> f32 {
    (1024 + (1 << (bits - 1))) as f32
}

/// Fields j and j + per_word / 2 of an unsigned word (a field of 4 or 8 bits in each 16-bit half) as the two f16
/// values 1024 + field, exactly: f16's 10-bit mantissa under the exponent of 1024 (0x6400) is the field itself. Two
/// values take three integer operations instead of a conversion each.
#[cube]
fn f16_field_pair(unsigned: u32, j: u32, #[comptime] bits: u32) -> u32 {
    let low_fields = comptime!(((1u32 << bits) - 1) * 0x0001_0001);
    ((unsigned >> (j * bits)) & low_fields) | 0x6400_6400
}

type WordPair = Vector<u32, Const<2>>;

/// Four f16 values: the tensor-core kernel's shared-memory element (8-byte stores, and fragment loads the driver
/// knows to be 8-byte aligned).
type Half4 = Vector<f16, Const<4>>;

/// The tiled kernel's partial sums on tensor cores (where the device has f16 cooperative matrices: Vulkan through
/// SPIR-V, CUDA): per step the cube stages `mma_depth` columns of x and the matching weight rows, dequantized, as f16
/// in shared memory, and each of its 8 planes multiplies a slice of the tile (64 rows of a 128-row tile, 32 of a
/// 32- or 64-row one, else 16) by its share of the outputs into f32 accumulators. The weights dequantize in f16
/// pairs (`f16_field_pair`, then field x scale in f16 arithmetic), so a word's outputs are staged in the order its
/// pairs come out, and put back in order when written out. The rounding of x, of the scale and of each weight to
/// f16 (2^-11 relative at most each) is the only difference from the f32 kernels: the accumulation stays f32.
/// Writes `partial` like `qmatmul_tile_kernel`.
#[cube(launch)]
fn qmatmul_mma_kernel(
    x: &Tensor<f32>,
    words: &Tensor<WordQuad>,
    scales: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    chunk_len: u32,
    #[comptime] bits: u32,
    #[comptime] tile_rows: u32,
) {
    let per_word = comptime!(32 / bits);
    // Planes over the tile: slices of plane_frags x 16 rows, each split across planes_n planes of n_frags fragments
    // of 16 outputs. A plane of several 16-row fragments uses each loaded fragment of the weight as many times.
    let plane_frags = comptime!(match tile_rows {
        128 => 4u32,
        16 => 1u32,
        _ => 2u32,
    });
    let planes_n = comptime!(THREADS / 32 / (tile_rows / FRAG / plane_frags));
    let n_frags = comptime!((MMA_TN / FRAG / planes_n) as usize);
    let quads_per_row = comptime!(MMA_TN / (4 * per_word));
    let depth = comptime!(mma_depth(tile_rows));
    let x_stride = comptime!(depth + MMA_PAD);
    let quad_passes = comptime!((depth * quads_per_row / THREADS) as usize);
    let x_passes = comptime!((tile_rows * depth / 4).div_ceil(THREADS) as usize);

    let plane = UNIT_POS_X / 32;
    let (plane_m, plane_n) = (plane / planes_n, plane % planes_n);
    let row0 = CUBE_POS_Z as usize * tile_rows as usize;
    let o0 = (CUBE_POS_X * MMA_TN) as usize;
    let k_dim = words.shape(0);
    let k_start = CUBE_POS_Y as usize * chunk_len as usize;
    let k_end = chunk_end(k_start, chunk_len, k_dim);

    let mut xv = Array::<Quad>::new(x_passes);
    let mut packed = Array::<WordQuad>::new(quad_passes);
    let mut s = Array::<f32>::new(quad_passes);
    mma_stage_loads(
        x,
        words,
        scales,
        &mut xv,
        &mut packed,
        &mut s,
        k_start,
        k_end,
        row0,
        o0,
        bits,
        tile_rows,
    );
    let mut xs = Shared::<[Half4]>::new_slice(comptime!((tile_rows * x_stride / 4) as usize));
    let mut wsh = Shared::<[Half4]>::new_slice(comptime!((depth * MMA_W_STRIDE / 4) as usize));
    // Fragment (m, f) of the plane's accumulators at m * n_frags + f.
    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(plane_frags as usize * n_frags) {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let bound = Quad::new(F16_MAX);
    let mut k0 = k_start;
    while k0 < k_end {
        // x clamped to f16's largest finite value: an activation past it would otherwise turn its row's sums to NaN.
        #[unroll]
        for p in 0..x_passes {
            let i = UNIT_POS_X + p as u32 * THREADS;
            if i < comptime!(tile_rows * depth / 4) {
                let (row, kq) = (i / (depth / 4), i % (depth / 4));
                let v = clamp(xv[p], -bound, bound);
                xs[(row * x_stride / 4 + kq) as usize] = Half4::cast_from(v);
            }
        }
        #[unroll]
        for p in 0..quad_passes {
            let idx = UNIT_POS_X + p as u32 * THREADS;
            let (kk, q) = (idx / quads_per_row, idx % quads_per_row);
            let w_at = ((kk * MMA_W_STRIDE + q * 4 * per_word) / 4) as usize;
            let scale = Half4::new(f16::cast_from(f32::min(s[p], F16_MAX)));
            #[unroll]
            for w in 0..4usize {
                let unsigned = packed[p].extract(w) ^ comptime!(field_sign_bits(bits));
                #[unroll]
                for h in 0..comptime!(per_word / 4) {
                    let mut pairs = WordPair::empty();
                    pairs.insert(0usize, f16_field_pair(unsigned, comptime!(2 * h), bits));
                    pairs.insert(1usize, f16_field_pair(unsigned, comptime!(2 * h + 1), bits));
                    let biased = Half4::reinterpret(pairs);
                    wsh[w_at + comptime!(w * (per_word / 4) as usize + h as usize)] =
                        (biased - Half4::new(f16::new(comptime!(f16_field_bias(bits))))) * scale;
                }
            }
        }
        sync_cube();
        if k0 + (depth as usize) < k_end {
            mma_stage_loads(
                x,
                words,
                scales,
                &mut xv,
                &mut packed,
                &mut s,
                k0 + depth as usize,
                k_end,
                row0,
                o0,
                bits,
                tile_rows,
            );
        }
        #[unroll]
        for kf in 0..depth / FRAG {
            let mut a = Sequence::<cmma::Matrix<f16>>::new();
            #[unroll]
            for m in 0..comptime!(plane_frags as usize) {
                let slice = plane_m * plane_frags + m as u32;
                let a_at = ((slice * FRAG * x_stride + kf * FRAG) / 4) as usize;
                a.push(f16_fragment(
                    &xs[a_at..a_at + comptime!((FRAG * x_stride / 4) as usize)],
                    x_stride,
                    cmma::MatrixIdent::A,
                ));
            }
            #[unroll]
            for f in 0..n_frags {
                let col = (plane_n as usize * n_frags + f) * FRAG as usize;
                let b_at = (kf * FRAG * MMA_W_STRIDE / 4) as usize + col / 4;
                let b = f16_fragment(
                    &wsh[b_at..b_at + comptime!((FRAG * MMA_W_STRIDE / 4) as usize)],
                    MMA_W_STRIDE,
                    cmma::MatrixIdent::B,
                );
                #[unroll]
                for m in 0..comptime!(plane_frags as usize) {
                    let acc = accs.index(m * n_frags + f);
                    cmma::execute(a.index(m), &b, acc, acc);
                }
            }
        }
        sync_cube();
        k0 += depth as usize;
    }
    // Each plane's accumulators go through its own 16 x 16 of shared memory, so that rows past x's and outputs past
    // the weight's are left out (a fragment's store has no bounds).
    let mut out_tile = Shared::<[f32]>::new_slice(comptime!((THREADS / 32 * FRAG * FRAG) as usize));
    let tile_at = (plane * FRAG * FRAG) as usize;
    let (base, row_stride) = (CUBE_POS_Y as usize * partial.stride(0), partial.stride(1));
    // The words' shape counts words (the quads' indices count quads).
    let (n_rows, out_dim) = (x.shape(0), words.shape(1) * per_word as usize);
    let lane = UNIT_POS_X % 32;
    #[unroll]
    for acc_index in 0..comptime!(plane_frags as usize * n_frags) {
        let (m, f) = comptime!((acc_index / n_frags, acc_index % n_frags));
        cmma::store(
            &mut out_tile[tile_at..tile_at + comptime!((FRAG * FRAG) as usize)],
            accs.index(acc_index),
            FRAG,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        #[unroll]
        for i in 0..comptime!(FRAG * FRAG / 32) {
            let e = lane + i * 32;
            let slice = plane_m * plane_frags + comptime!(m as u32);
            let row = row0 + (slice * FRAG + e / FRAG) as usize;
            // Column c of a word's per_word staged columns holds its field c / 2 + (c % 2) per_word / 2.
            let column = e % per_word;
            let field = column / 2 + (column % 2) * comptime!(per_word / 2);
            let o = o0
                + (plane_n as usize * n_frags + f) * FRAG as usize
                + (e % FRAG - column + field) as usize;
            if row < n_rows && o < out_dim {
                partial[base + row * row_stride + o] = out_tile[tile_at + e as usize];
            }
        }
        sync_plane();
    }
}

/// A 16 x 16 f16 fragment of the tensor-core products (`ident`: the A or B operand), loaded row-major from `tile`,
/// whose rows lie `stride` f16 apart.
#[cube]
fn f16_fragment(
    tile: &[Half4],
    stride: u32,
    #[comptime] ident: cmma::MatrixIdent,
) -> cmma::Matrix<f16> {
    let mut fragment = unsafe {
        cmma::Matrix::<f16>::uninitialized(
            ident,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
        )
    };
    cmma::load(&mut fragment, tile, stride);
    fragment
}

/// The global loads of one step of the tensor-core kernel into registers: this thread's quads of x (zero past the
/// rows or the chunk) and its quads of words with their scales (zero past the outputs or the chunk, which
/// dequantizes to zero).
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_stage_loads(
    x: &Tensor<f32>,
    words: &Tensor<WordQuad>,
    scales: &Tensor<f32>,
    xv: &mut Array<Quad>,
    packed: &mut Array<WordQuad>,
    s: &mut Array<f32>,
    k0: usize,
    k_end: usize,
    row0: usize,
    o0: usize,
    #[comptime] bits: u32,
    #[comptime] tile_rows: u32,
) {
    let per_word = comptime!(32 / bits);
    let quads_per_row = comptime!(MMA_TN / (4 * per_word));
    let depth = comptime!(mma_depth(tile_rows));
    let quad_passes = comptime!((depth * quads_per_row / THREADS) as usize);
    let x_passes = comptime!((tile_rows * depth / 4).div_ceil(THREADS) as usize);
    let (xst, wst, sst) = (x.stride(0), words.stride(0), scales.stride(0));
    #[unroll]
    for p in 0..x_passes {
        let i = UNIT_POS_X + p as u32 * THREADS;
        let (row, kq) = (row0 + (i / (depth / 4)) as usize, i % (depth / 4));
        let mut v = Quad::new(0.0);
        #[unroll]
        for j in 0..4u32 {
            let k = k0 + (kq * 4 + j) as usize;
            if row < x.shape(0) && k < k_end {
                v.insert(j as usize, x[row * xst + k]);
            }
        }
        xv[p] = v;
    }
    #[unroll]
    for p in 0..quad_passes {
        let idx = UNIT_POS_X + p as u32 * THREADS;
        let (kk, q) = (idx / quads_per_row, idx % quads_per_row);
        let word = o0 / per_word as usize + (q * 4) as usize;
        let k = k0 + kk as usize;
        let mut v = WordQuad::new(0u32);
        let mut scale = 0.0f32;
        if word < words.shape(1) && k < k_end {
            v = words[(k * wst + word) / 4];
            scale = scales[k * sst + word * per_word as usize / 32];
        }
        packed[p] = v;
        s[p] = scale;
    }
}

/// The global loads of one step of the tiled kernel into registers: this thread's quad of x (zero past the rows
/// or the chunk) and its words and scales (zero past the outputs or the chunk, which dequantizes to zero).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_loads(
    x: &Tensor<f32>,
    words: &Tensor<u32>,
    scales: &Tensor<f32>,
    xv: &mut Array<f32>,
    packed: &mut Array<u32>,
    s: &mut Array<f32>,
    k0: usize,
    k_end: usize,
    row0: usize,
    o0: usize,
    x_kk: u32,
    x_rq: u32,
    #[comptime] bits: u32,
    #[comptime] tile_rows: u32,
) {
    let (xst, wst, sst) = (x.stride(0), words.stride(0), scales.stride(0));
    let per_word = comptime!(32 / bits);
    let words_per_row = comptime!(GEMM_TN / per_word);
    let word_passes = comptime!((GEMM_DEPTH * words_per_row / THREADS) as usize);
    if UNIT_POS_X < comptime!(GEMM_DEPTH * tile_rows / 4) {
        let k = k0 + x_kk as usize;
        #[unroll]
        for j in 0..4usize {
            let row = row0 + x_rq as usize * 4 + j;
            let mut v = 0.0f32;
            if row < x.shape(0) && k < k_end {
                v = x[row * xst + k];
            }
            xv[j] = v;
        }
    }
    #[unroll]
    for p in 0..word_passes {
        let idx = UNIT_POS_X + p as u32 * THREADS;
        let (kk, w) = (idx / words_per_row, idx % words_per_row);
        let word = o0 / per_word as usize + w as usize;
        let k = k0 + kk as usize;
        let mut v = 0u32;
        let mut scale = 0.0f32;
        if word < words.shape(1) && k < k_end {
            v = words[k * wst + word];
            scale = scales[k * sst + word * per_word as usize / 32];
        }
        packed[p] = v;
        s[p] = scale;
    }
}

/// What the chunk-summing pass does with each output besides adding the bias: the work of the elementwise launches
/// that would otherwise follow the product.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    None,
    /// y = x W + residual (the residual stream's add after the attention output and the MLP down projections).
    Residual(&'a BurnTensor<2>),
    /// W holds [gate | up] side by side: y = act(x W_gate) * (x W_up), half as wide (a gated MLP's first half).
    Gated(Activation),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (Gemma's gelu_pytorch_tanh).
    GeluTanh,
}

const EPILOGUE_NONE: u32 = 0;
const EPILOGUE_RESIDUAL: u32 = 1;
const EPILOGUE_SILU: u32 = 2;
const EPILOGUE_GELU_TANH: u32 = 3;

/// The end of the chunk of k that starts at k0: chunk_len rows on, the last chunk cut at k_dim.
#[cube]
fn chunk_end(k0: usize, chunk_len: u32, k_dim: usize) -> usize {
    let end = k0 + chunk_len as usize;
    if end < k_dim {
        end
    } else {
        k_dim
    }
}

/// The sums over chunks of partial[c, r, o] and, with `two`, of partial[c, r, o2] (0 without), each in chunk order,
/// CHUNK_UNROLL chunks' loads of each in flight at a time (loads past the last chunk read it again and are left
/// out of the sums). Two columns at once: a gated epilogue's gate and up, a RoPE pair.
#[cube]
pub(crate) fn chunk_sums(
    partial: &Tensor<f32>,
    r: usize,
    o: usize,
    o2: usize,
    #[comptime] two: bool,
) -> (f32, f32) {
    let (chunks, cs) = (partial.shape(0), partial.stride(0));
    let row = r * partial.stride(1);
    let mut s = 0.0f32;
    let mut s2 = 0.0f32;
    let mut c = 0;
    while c < chunks {
        let mut v = Array::<f32>::new(CHUNK_UNROLL);
        let mut v2 = Array::<f32>::new(CHUNK_UNROLL);
        #[unroll]
        for u in 0..CHUNK_UNROLL {
            let at = min(c + u, chunks - 1) * cs + row;
            v[u] = partial[at + o];
            if two {
                v2[u] = partial[at + o2];
            }
        }
        #[unroll]
        for u in 0..CHUNK_UNROLL {
            if c + u < chunks {
                s += v[u];
                if two {
                    s2 += v2[u];
                }
            }
        }
        c += CHUNK_UNROLL;
    }
    (s, s2)
}

/// The gated epilogues' activation of a gate value.
#[cube]
fn activate(gate: f32, #[comptime] epilogue: u32) -> f32 {
    if comptime!(epilogue == EPILOGUE_SILU) {
        gate / (1.0 + (-gate).exp())
    } else {
        // sqrt(2 / pi)
        let inner = 0.797_884_6f32 * (gate + 0.044_715f32 * gate * gate * gate);
        0.5 * gate * (1.0 + inner.tanh())
    }
}

/// acc[j] += xv * field j of `packed` (a word of 32 / bits signed fields).
/// acc[r, j] += x[r, k] * s * field j of `packed`, for every row r of x.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_rows(
    acc: &mut Array<f32>,
    x: &Tensor<f32>,
    xs: usize,
    k: usize,
    packed: u32,
    s: f32,
    #[comptime] bits: u32,
    #[comptime] rows: u32,
) {
    let per_word = comptime!(32 / bits);
    let mut xv = Array::<f32>::new(comptime!(rows as usize));
    #[unroll]
    for r in 0..rows {
        xv[r as usize] = x[r as usize * xs + k] * s;
    }
    #[unroll]
    for j in 0..per_word {
        let q = field_value(packed, j, bits);
        #[unroll]
        for r in 0..rows {
            acc[(r * per_word + j) as usize] += xv[r as usize] * q;
        }
    }
}

/// Field j of a packed word, a two's-complement integer of `bits` bits, as f32. Without an integer-to-float
/// conversion (a fraction of the arithmetic rate on NVIDIA GPUs; it held 4-bit single-row products to a fifth of
/// the bandwidth): the field with its sign bit flipped (v + half) goes into the mantissa of 2^23, and the float
/// 2^23 + v + half, less 2^23 + half, is v exactly.
#[cube]
fn field_value(packed: u32, j: u32, #[comptime] bits: u32) -> f32 {
    let mask = comptime!((1u32 << bits) - 1);
    let half = comptime!(1u32 << (bits - 1));
    let biased = ((packed >> (j * bits)) & mask) ^ comptime!(half | 0x4B00_0000u32);
    f32::reinterpret(biased) - comptime!(8_388_608.0f32 + half as f32)
}

/// Rows of k a thread of these kernels loads at once.
const ROW_UNROLL: u32 = 4;
/// Chunks' partial sums a thread loads at once when adding them up: the sums' loads wait on one another, so a
/// down projection's 74 chunks took 19 waits with 4 in flight.
const CHUNK_UNROLL: usize = 16;
/// Quads of words (16 bytes: 32 outputs at 4 bits, 16 at 8) one cube of the single-row kernel owns, and the slices
/// of k its threads split: a run of 32 threads reads 4 rows x 128 contiguous bytes.
const ROW_QUADS: u32 = 8;
const ROW_SLICES: u32 = 16;
const ROW_THREADS: u32 = ROW_QUADS * ROW_SLICES;
/// Rows of k one round of a single-row cube covers.
const ROW_ROUND: usize = (ROW_SLICES * ROW_UNROLL) as usize;
/// Cubes a single row's product aims for, splitting k into chunks to get there, and the fewest rounds a chunk
/// takes (each chunk's partial sums are written and added again). On the H200 (Qwen2.5-7B, batch 1) 512 or 2048
/// cubes, and 1 or 4 rounds, decoded within 3% of these; cubes of 16 or 32 quads (256 or 512 contiguous bytes a
/// row) 3-10% and 18-27% slower.
const ROW_TARGET_CUBES: usize = 1024;
const ROW_MIN_ROUNDS: usize = 2;
/// Most cubes of a single row's product that computes its input's RMSNorm itself (see `folds_norm`).
const FOLD_MAX_CUBES: usize = 2048;

type WordQuad = Vector<u32, Const<4>>;

/// Partial sums of x W over one chunk of k (the grid's second axis) for a single row x: each thread owns a quad of
/// adjacent words, loaded as one 16-byte vector (with 4-byte words the kernel reached a fifth of the copy
/// bandwidth: too few bytes in flight), the cube's ROW_SLICES slices of k take interleaved rows, and the slices'
/// sums are halved together in shared memory. A quad's outputs share one scale (a block of 32 holds one quad of
/// 4-bit words, two of 8-bit ones). Writes `partial` like `qmatvec_kernel`.
///
/// With `normed`, the product is of RMSNorm(x) with weight `norm` instead (x * inv_rms * norm): every cube computes
/// the row's inverse RMS itself (x is one row, read from cache, summed in the same order by every cube), scales x by
/// `norm` as it loads it and its sums by inv_rms as it writes them, which saves the separate RMSNorm launch.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn qmatvec_row_kernel(
    x: &Tensor<f32>,
    words: &Tensor<WordQuad>,
    scales: &Tensor<f32>,
    norm: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    chunk_len: u32,
    eps: f32,
    #[comptime] bits: u32,
    #[comptime] normed: bool,
) {
    let per_word = comptime!(32 / bits);
    let outs = comptime!((4 * per_word) as usize);
    let lq = UNIT_POS_X % ROW_QUADS;
    let slice = UNIT_POS_X / ROW_QUADS;
    // Shape and strides count words; indices count quads.
    let n_words = words.shape(1);
    let word0 = ((CUBE_POS_X * ROW_QUADS + lq) * 4) as usize;
    let k_dim = words.shape(0);
    let k0 = CUBE_POS_Y as usize * chunk_len as usize;
    let k1 = chunk_end(k0, chunk_len, k_dim);
    let mut acc = Array::<f32>::new(outs);
    #[unroll]
    for j in 0..outs {
        acc[j] = 0.0;
    }
    // Threads past the outputs read the last quad, weighted 0: every thread runs the same loop (the norm's
    // reduction syncs the cube).
    let live = word0 < n_words;
    let word = if live { word0 } else { n_words - 4 };
    let scale_col = word * per_word as usize / 32;
    let mut packed = Array::<WordQuad>::new(comptime!(ROW_UNROLL as usize));
    let mut xv = Array::<f32>::new(comptime!(ROW_UNROLL as usize));
    let mut k = k0 + slice as usize;
    load_round(
        x,
        words,
        scales,
        norm,
        &mut packed,
        &mut xv,
        k,
        k1,
        word,
        scale_col,
        live,
        normed,
    );
    // The norm's loads come from cache, behind the first round's.
    let mut inv_rms = 1.0f32;
    if normed {
        inv_rms = crate::norm::row_inv_rms(x, 0, x.shape(1), eps, ROW_THREADS);
    }
    // The next round's loads wait for this round's products: loading them first (into a second set of registers)
    // ran no faster on the H200, nor did 2 or 8 rows a round.
    while k < k1 {
        #[unroll]
        for u in 0..ROW_UNROLL {
            accumulate_quad(&mut acc, packed[u as usize], xv[u as usize], bits);
        }
        k += ROW_ROUND;
        if k < k1 {
            load_round(
                x,
                words,
                scales,
                norm,
                &mut packed,
                &mut xv,
                k,
                k1,
                word,
                scale_col,
                live,
                normed,
            );
        }
    }
    // The upper half of the live slices hands its sums to the lower half, until slice 0 holds the cube's. Stored
    // output-major, so that a run of 32 threads writes 32 consecutive floats (different banks).
    let stride = comptime!((ROW_SLICES / 2 * ROW_QUADS) as usize);
    let mut sums = Shared::<[f32]>::new_slice(comptime!(outs * stride));
    // Halved each round; taken from the cube size (a runtime value) so that it can change.
    let mut half = CUBE_DIM_X / (2 * ROW_QUADS);
    while half > 0 {
        if slice >= half && slice < 2 * half {
            let at = ((slice - half) * ROW_QUADS + lq) as usize;
            #[unroll]
            for j in 0..outs {
                sums[j * stride + at] = acc[j];
            }
        }
        sync_cube();
        if slice < half {
            let at = (slice * ROW_QUADS + lq) as usize;
            #[unroll]
            for j in 0..outs {
                acc[j] += sums[j * stride + at];
            }
        }
        sync_cube();
        half /= 2;
    }
    if slice == 0 && live {
        let at = CUBE_POS_Y as usize * partial.stride(0) + word0 * per_word as usize;
        #[unroll]
        for j in 0..outs {
            partial[at + j] = acc[j] * inv_rms;
        }
    }
}

/// One round of a single-row cube's loads: rows k, k + ROW_SLICES, ... (ROW_UNROLL of them) of the quad at `word`,
/// with x times the row's scale (and norm weight); rows past k1, and every row of a thread past the outputs,
/// read row k1 - 1 weighted 0.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_round(
    x: &Tensor<f32>,
    words: &Tensor<WordQuad>,
    scales: &Tensor<f32>,
    norm: &Tensor<f32>,
    packed: &mut Array<WordQuad>,
    xv: &mut Array<f32>,
    k: usize,
    k1: usize,
    word: usize,
    scale_col: usize,
    live: bool,
    #[comptime] normed: bool,
) {
    let (ws, ss) = (words.stride(0), scales.stride(0));
    #[unroll]
    for u in 0..ROW_UNROLL {
        let row = k + (u * ROW_SLICES) as usize;
        let inside = row < k1;
        let at = if inside { row } else { k1 - 1 };
        packed[u as usize] = words[(at * ws + word) / 4];
        let mut v = x[at] * scales[at * ss + scale_col];
        if normed {
            v *= norm[at];
        }
        xv[u as usize] = if inside && live { v } else { 0.0f32 };
    }
}

/// acc[w * per_word + j] += xv * field j of word w of the quad, in fewer integer operations than `field_value`
/// (NVIDIA GPUs run them at half the float rate): each half word's fields are masked in place (one and-xor) rather
/// than shifted down first. The same products exactly; 1-2% less time in the single-row products on the H200.
#[cube]
fn accumulate_quad(acc: &mut Array<f32>, packed: WordQuad, xv: f32, #[comptime] bits: u32) {
    let per_word = comptime!(32 / bits);
    let per_half = comptime!(16 / bits);
    // xv * 2^(23 - s) for the field at bit s of a half word (a power-of-two scaling: exact).
    let mut scaled = Array::<f32>::new(comptime!(per_half as usize));
    #[unroll]
    for i in 0..per_half {
        scaled[i as usize] = xv * comptime!((1u32 << (23 - i * bits)) as f32);
    }
    #[unroll]
    for w in 0..4usize {
        let word = packed.extract(w);
        let base = comptime!(w * per_word as usize);
        accumulate_half(acc, word, &scaled, base, bits);
        accumulate_half(acc, word >> 16, &scaled, base + per_half as usize, bits);
    }
}

/// acc[base + i] += scaled[i] * 2^(s - 23) * field i of the low 16 bits of `half_word` (s = i * bits). The field,
/// its sign bit flipped (v + half), sits in the mantissa of 1.0 where it lies: the float is
/// 1 + (v + half) * 2^(s - 23), and less 1 + half * 2^(s - 23) it is v * 2^(s - 23) exactly.
#[cube]
fn accumulate_half(
    acc: &mut Array<f32>,
    half_word: u32,
    scaled: &Array<f32>,
    base: usize,
    #[comptime] bits: u32,
) {
    let per_half = comptime!(16 / bits);
    let mask = comptime!((1u32 << bits) - 1);
    let half = comptime!(1u32 << (bits - 1));
    #[unroll]
    for i in 0..per_half {
        let s = comptime!(i * bits);
        let f = f32::reinterpret(
            (half_word & comptime!(mask << s)) ^ comptime!(0x3F80_0000u32 | (half << s)),
        );
        let offset = comptime!((1.0f64 + half as f64 * (s as f64 - 23.0).exp2()) as f32);
        acc[base + i as usize] += scaled[i as usize] * (f - offset);
    }
}

/// y[r, o] = sum over chunks of partial[c, r, o] (+ bias[o]), then the epilogue: + residual[r, o], or for
/// the gated forms act(gate) * up with up at column o + y's width.
#[cube(launch)]
fn sum_chunks_kernel(
    partial: &Tensor<f32>,
    bias: &Tensor<f32>,
    residual: &Tensor<f32>,
    y: &mut Tensor<f32>,
    #[comptime] has_bias: bool,
    #[comptime] epilogue: u32,
) {
    let out = y.shape(1);
    let i = ABSOLUTE_POS;
    if i >= partial.shape(1) * out {
        terminate!();
    }
    let (row, o) = (i / out, i % out);
    // The gated forms add up the matching up column too.
    let gated = comptime!(epilogue == EPILOGUE_SILU || epilogue == EPILOGUE_GELU_TANH);
    let (sum, up) = chunk_sums(partial, row, o, o + out, gated);
    let s = finish_output(sum, up, bias, residual, row, o, out, has_bias, epilogue);
    let at = row * y.stride(0) + o;
    y[at] = s;
}

/// Output o of row `row` from its product `s` (and, for the gated forms, the matching up product at column
/// o + width): the bias, then the epilogue.
#[cube]
#[allow(clippy::too_many_arguments)]
fn finish_output(
    s: f32,
    up: f32,
    bias: &Tensor<f32>,
    residual: &Tensor<f32>,
    row: usize,
    o: usize,
    width: usize,
    #[comptime] has_bias: bool,
    #[comptime] epilogue: u32,
) -> f32 {
    let mut v = s;
    if has_bias {
        v += bias[o];
    }
    if comptime!(epilogue == EPILOGUE_RESIDUAL) {
        v += residual[row * residual.stride(0) + o];
    }
    if comptime!(epilogue == EPILOGUE_SILU || epilogue == EPILOGUE_GELU_TANH) {
        let mut u = up;
        if has_bias {
            u += bias[o + width];
        }
        v = activate(v, epilogue) * u;
    }
    v
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
        // The single-row kernel reads the words of a row as 16-byte quads.
        let quad_rows = words.meta.strides()[1] == 1 && words.meta.strides()[0] % 4 == 0;
        if ws[..] != [k, out / per_word]
            || ss[..] != [k, out / BLOCK]
            || out % BLOCK != 0
            || !quad_rows
        {
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

    /// (chunk length, chunks) of a single row's product.
    fn row_chunks(&self) -> (usize, usize) {
        let rounds = self.k.div_ceil(ROW_ROUND);
        let chunks = ROW_TARGET_CUBES
            .div_ceil(self.row_columns())
            .min(rounds / ROW_MIN_ROUNDS)
            .max(1);
        let chunk_len = rounds.div_ceil(chunks) * ROW_ROUND;
        (chunk_len, self.k.div_ceil(chunk_len))
    }

    /// Cubes across the outputs of a single row's product.
    fn row_columns(&self) -> usize {
        let words = self.out / (32 / self.bits as usize);
        words.div_ceil(4 * ROW_QUADS as usize)
    }

    /// Whether a single row's product takes its input's RMSNorm in: where its cubes fit in about one wave of the
    /// device. Each cube computes the row's norm itself: with 4-byte loads that cost the 8000 cubes of Qwen2.5-7B's
    /// gate/up 17 us on the H200 against 4 us for the 300 of q/k/v (a separate RMSNorm launch: 9 us). With quads
    /// (1036 cubes for gate/up) and the norm's 16 loads a thread in flight behind the first round's, folding it
    /// into gate/up as well decoded 1-2% faster.
    fn folds_norm(&self) -> bool {
        self.row_columns() * self.row_chunks().1 <= FOLD_MAX_CUBES
    }

    /// Whether the product with x takes f16 inputs on tensor cores: more rows than the matvec kernel takes, on a
    /// device with 16 x 16 x 16 f16 cooperative matrices (f32 accumulators), planes of 32 and the shared memory the
    /// kernel takes (46 KiB at most): Vulkan through SPIR-V, CUDA; not WebGPU, whose WGSL has no matrix types. The
    /// result then differs from the f32 kernels' only by the rounding to f16 of x, of each block's scale and of
    /// each dequantized weight (x and the scales clamped to f16's range, ±65504).
    pub fn rounds_to_f16(&self, x: &BurnTensor<2>) -> bool {
        let Some(xc) = to_cube(x) else {
            return false;
        };
        let props = xc.client.properties();
        let f16_mma = MmaConfig {
            a_type: ElemType::Float(FloatKind::F16),
            b_type: ElemType::Float(FloatKind::F16),
            cd_type: ElemType::Float(FloatKind::F32),
            m: FRAG,
            n: FRAG,
            k: FRAG,
        };
        let rows = x.dims()[0];
        rows > MATVEC_ROWS
            && props.features.matmul.cmma.contains(&f16_mma)
            && props.hardware.max_shared_memory_size
                >= mma_shared_bytes(tile_rows(rows, true) as u32)
            && props.hardware.plane_size_min == 32
            && props.hardware.plane_size_max == 32
    }

    /// x W (+ bias), then the epilogue, for x [rows, k]; `None` when x is not an f32 tensor on the weight's
    /// device or the epilogue does not fit the shapes (the caller takes its generic path).
    ///
    /// With `norm` (weight [k], eps) the product is of RMSNorm(x) instead: folded into a single row's product of
    /// few cubes, a separate RMSNorm launch before the others.
    pub fn matvec(
        &self,
        x: &BurnTensor<2>,
        bias: Option<&BurnTensor<1>>,
        epilogue: Epilogue<'_>,
        norm: Option<(&BurnTensor<1>, f32)>,
    ) -> Option<BurnTensor<2>> {
        let rows = x.dims()[0];
        let (out, residual, epilogue) = match epilogue {
            Epilogue::None => (self.out, None, EPILOGUE_NONE),
            Epilogue::Residual(r) if r.dims() == [rows, self.out] && r.dtype() == DType::F32 => {
                (self.out, Some(to_cube(r)?), EPILOGUE_RESIDUAL)
            }
            Epilogue::Residual(_) => return None,
            // Gate and up halves of whole blocks (a word never straddles the two).
            Epilogue::Gated(_) if self.out % (2 * BLOCK) != 0 => return None,
            Epilogue::Gated(Activation::Silu) => (self.out / 2, None, EPILOGUE_SILU),
            Epilogue::Gated(Activation::GeluTanh) => (self.out / 2, None, EPILOGUE_GELU_TANH),
        };
        let bias = match bias {
            Some(b) if b.dims() == [self.out] && b.dtype() == DType::F32 => Some(to_cube(b)?),
            Some(_) => return None,
            None => None,
        };
        let partial = to_cube(&self.partial_sums(x, norm)?)?;
        let client = partial.client.clone();
        let y = empty_like(&partial, [rows, out], DType::F32);
        let dim = CubeDim::new_1d(THREADS);
        // Absent bias and residual bind a stand-in buffer the kernel never reads.
        sum_chunks_kernel::launch(
            &client,
            calculate_cube_count_elemwise(&client, rows * out, dim),
            dim,
            partial.clone().into_tensor_arg(),
            bias.clone().unwrap_or(partial.clone()).into_tensor_arg(),
            residual
                .clone()
                .unwrap_or(partial.clone())
                .into_tensor_arg(),
            y.clone().into_tensor_arg(),
            bias.is_some(),
            epilogue,
        );
        Some(from_cube(y))
    }

    /// The partial sums of x W (of RMSNorm(x) with `norm`) over chunks of k, [chunks, rows, out], for x [rows, k]:
    /// what `matvec` adds up, for a consumer that adds them itself (`rope_into_cache`). `None` where `matvec`
    /// would decline.
    pub fn partial_sums(
        &self,
        x: &BurnTensor<2>,
        norm: Option<(&BurnTensor<1>, f32)>,
    ) -> Option<BurnTensor<3>> {
        let [rows, k] = x.dims();
        if rows == 0 || k != self.k || x.dtype() != DType::F32 {
            return None;
        }
        if norm.is_some_and(|(w, _)| w.dims() != [k] || w.dtype() != DType::F32) {
            return None;
        }
        if let Some((w, eps)) = norm.filter(|_| rows > 1 || !self.folds_norm()) {
            let normed = crate::rms_norm(x, w, eps, None)?;
            return self.partial_sums(&normed, None);
        }
        let xc = into_contiguous(to_cube(x)?);
        let client = xc.client.clone();
        let n_words = self.words.meta.shape()[1];
        let weight_bytes =
            self.k * self.out * self.bits as usize / 8 + self.k * self.out / BLOCK * 4;
        let partial = |chunks: usize| empty_like(&xc, [chunks, rows, self.out], DType::F32);
        // Every tile of rows in one launch (the grid's third axis), then every row's chunks summed in one more.
        let partial = if rows == 1 {
            let (chunk_len, chunks) = self.row_chunks();
            let partial = partial(chunks);
            // Without a norm the kernel binds x in its place and never reads it as such.
            let norm_weight = match norm {
                Some((w, _)) => to_cube(w)?,
                None => xc.clone(),
            };
            qmatvec_row_kernel::launch(
                &client,
                CubeCount::Static(self.row_columns() as u32, partial.meta.shape()[0] as u32, 1),
                CubeDim::new_1d(ROW_THREADS),
                xc.clone().into_tensor_arg(),
                self.words.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
                norm_weight.into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                chunk_len as u32,
                norm.map_or(0.0, |n| n.1),
                self.bits,
                norm.is_some(),
            );
            partial
        } else if rows <= MATVEC_ROWS {
            // Enough chunks to fill the device, few enough that the partial sums (written and read back: 8 bytes
            // a value) stay within half the weight's bytes.
            let chunks = TARGET_THREADS
                .div_ceil(n_words)
                .min(weight_bytes / (2 * 8 * rows * self.out))
                .min(self.k / 32)
                .max(1);
            let chunk_len = self.k.div_ceil(chunks);
            let partial = partial(self.k.div_ceil(chunk_len));
            qmatvec_kernel::launch(
                &client,
                CubeCount::Static(
                    n_words.div_ceil(THREADS as usize) as u32,
                    partial.meta.shape()[0] as u32,
                    1,
                ),
                CubeDim::new_1d(THREADS),
                xc.clone().into_tensor_arg(),
                self.words.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                chunk_len as u32,
                self.bits,
                rows as u32,
            );
            partial
        } else {
            // Tiles of 16 to 128 rows; chunks of k (whole steps, GEMM_MIN_K rows at least) until the cubes fill
            // the device.
            let tensor_cores = self.rounds_to_f16(x);
            let tile_rows = tile_rows(rows, tensor_cores);
            let row_tiles = rows.div_ceil(tile_rows);
            let (tile_outs, depth) = match tensor_cores {
                true => (MMA_TN, mma_depth(tile_rows as u32)),
                false => (GEMM_TN, GEMM_DEPTH),
            };
            let tiles = self.out.div_ceil(tile_outs as usize);
            let steps = self.k.div_ceil(depth as usize);
            let chunks = GEMM_TARGET_CUBES
                .div_ceil(tiles * row_tiles)
                .min(self.k / GEMM_MIN_K)
                .max(1);
            let chunk_len = steps.div_ceil(chunks) * depth as usize;
            let partial = partial(self.k.div_ceil(chunk_len));
            let count = CubeCount::Static(
                tiles as u32,
                partial.meta.shape()[0] as u32,
                row_tiles as u32,
            );
            let dim = CubeDim::new_1d(THREADS);
            let (x, words, scales) = (
                xc.clone().into_tensor_arg(),
                self.words.clone().into_tensor_arg(),
                self.scales.clone().into_tensor_arg(),
            );
            let (out, bits, tile_rows) = (
                partial.clone().into_tensor_arg(),
                self.bits,
                tile_rows as u32,
            );
            if tensor_cores {
                qmatmul_mma_kernel::launch(
                    &client,
                    count,
                    dim,
                    x,
                    words,
                    scales,
                    out,
                    chunk_len as u32,
                    bits,
                    tile_rows,
                );
            } else {
                qmatmul_tile_kernel::launch(
                    &client,
                    count,
                    dim,
                    x,
                    words,
                    scales,
                    out,
                    chunk_len as u32,
                    bits,
                    tile_rows,
                );
            }
            partial
        };
        Some(from_cube(partial))
    }
}
