//! avbridge's decoder runtime on burn. One code base for every backend: the model runs on whatever burn
//! `Device` it is loaded onto (CPU via burn-flex, wgpu/WebGPU, CUDA), chosen by cargo features and at run time.
//!
//! Families, one file each: [`qwen2`], [`llama`], [`gemma3`]. Weights come from GGUF or Hugging Face
//! checkpoints or web bundles ([`weights`], packed by [`pack`]); [`model`] holds the shared decoder with capture
//! and injection.

pub mod bert;
pub mod capture;
pub mod config;
pub mod cross;
pub mod gemma3;
pub mod generate;
mod kernels;
pub mod llama;
pub mod loader;
pub mod model;
pub mod pack;
pub mod qwen2;
pub mod sample;
pub mod weights;

pub use bert::SentenceEmbedder;
pub use burn::tensor::Device;
pub use config::{Family, ModelConfig};
pub use generate::{
    generate, generate_async, Control, Decoder, Finish, GenerateOptions, Generation, Sampling,
};
pub use kernels::matmul;
pub use model::{DecodeSteps, Injection, Input, KvCache, Model, Precision};
