//! avbridge model runtime. This first part reads checkpoints: GGUF (llama.cpp) with dequantization of the
//! quantized block formats; the burn-based decoder runtime builds on it.

pub mod gguf;
pub mod quant;
