//! pagedserve: an LLM server in the spirit of vLLM (PagedAttention, continuous batching) whose
//! scheduling, sampling and filtering policies are sandboxed WebAssembly components.
//!
//! This crate is the native host. Data flows one way: model loading (`model`) and tokenization
//! (`tokenizer`) feed the runner (`runner`), which runs batches of sequences through the CPU
//! reference forward (`model::cpu`) over a paged KV cache (`kv_cache`). In the server, HTTP
//! requests (`server`, wire types in `api`) are checked and tokenized by `validation` and handed to
//! the engine thread (`engine`), which schedules (`sched`), runs and samples (`sampling`) them and
//! streams events back. Structured outputs hold samples to a grammar (`constraint`); chat tools
//! are rendered into prompts and parsed back out of outputs (`tool_calls`).
//! Scheduling policies, sampling strategies, request filters and output constraints can be
//! WebAssembly components (`plugin`); the CUDA backend (`cuda`) runs the same batches on a GPU.

pub mod api;
#[cfg(feature = "tools")]
pub mod bench;
pub mod constraint;
pub mod cuda;
pub mod engine;
pub mod kv_cache;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod runner;
pub mod sampling;
pub mod sched;
pub mod server;
pub mod tokenizer;
pub mod tool_calls;
pub mod validation;
