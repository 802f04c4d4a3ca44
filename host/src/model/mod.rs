//! Model definitions and loading: the Llama-family configuration, weight sources (GGUF files,
//! Hugging Face directories, deterministic dummy weights) and the CPU reference forward.

pub mod gguf;
