//! avbridge model runtime. This first part reads checkpoints: GGUF (llama.cpp) with dequantization of the
//! quantized block formats, and Hugging Face safetensors checkpoints (sharded or not); the burn-based decoder
//! runtime builds on them.

pub mod checkpoint;
pub mod gguf;
pub mod quant;
pub mod tokenizer;
