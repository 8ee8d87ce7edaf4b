//! avbridge model runtime. This first part reads checkpoints: GGUF (llama.cpp) with dequantization of the
//! quantized block formats, Hugging Face safetensors checkpoints (sharded or not), tokenizers and chat templates;
//! the burn-based decoder runtime builds on them.

pub mod chat;
pub mod checkpoint;
pub mod gguf;
pub mod quant;
pub mod tokenizer;
