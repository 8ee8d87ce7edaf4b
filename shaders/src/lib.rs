//! avbridge's GPU kernels. Each is a CubeCL `#[cube]` kernel: one Rust source that CubeCL compiles to WGSL for
//! WebGPU (the browser, and wgpu on Vulkan/Metal natively) and to CUDA C++ for NVIDIA's own driver. The host
//! functions here take and return burn tensors, so the runtime calls them in place of a chain of generic tensor
//! ops when its tensors live on a CubeCL device, and keeps the generic path elsewhere (the CPU backend).
//!
//! - [`rms_norm`]: one pass per row instead of six elementwise and reduction launches.
//! - [`QuantizedWeight::matvec`]: decode-time products with the runtime's block-quantized weights (8- or 4-bit
//!   values, one f32 scale per 32 outputs), read packed straight from burn's storage: no dequantized copy; with
//!   the residual add or a gated MLP's activation fused into its final pass.
//! - [`rope`]: rotate-half RoPE and the move of the heads axis in one launch; [`rope_into_cache`]: a decoding
//!   step's q and k rotated and k and v written into the KV cache, from the fused q/k/v projection, in one launch.
//! - [`argmax`]: greedy decoding's token choice, one cube per row (burn's generic argmax took 16 ms for one
//!   row of a 152k vocabulary on the H200); [`sample_top_p`]: sampled decoding's (temperature, nucleus), the
//!   host's draws given, so that a sampled step too reads back one id a row.
//! - [`decode_attention`]: a new token's attention over the preallocated KV cache (GQA, padding, sliding window,
//!   soft-capping) in one launch instead of about ten.
//! - [`gather_rows`]: embedding rows of token ids that live on the device.
//! - [`matmul_f32`]: float products in f32 where burn's generic matmul would round f32 to TF32 (CUDA).
//! - [`Recording`] / [`StepGraph`]: a decoding step recorded once and replayed (CubeCL graphs); positions and ids
//!   reach the kernels through device buffers written in place ([`write_i32`]), so one recording serves every step.
#![cfg(any(feature = "wgpu", feature = "webgpu", feature = "cuda"))]

mod argmax;
mod attention;
mod cube;
mod embed;
mod graph;
mod matmul;
mod norm;
mod qmatvec;
mod rope;
mod sample;

pub use argmax::argmax;
pub use attention::{decode_attention, decode_attention_fits, MAX_KEYS};
pub use cube::on_cube;
pub use embed::gather_rows;
pub use graph::{copy_i32_into, snapshot_i32, write_f32, write_i32, Recording, StepGraph};
pub use matmul::{matmul_f32, matmul_rounds_to_tf32};
pub use norm::rms_norm;
pub use qmatvec::{Activation, Epilogue, QuantizedWeight};
pub use rope::{rope, rope_into_cache, QkvSource};
pub use sample::{sample_fits, sample_top_p};
