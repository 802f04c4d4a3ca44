//! Running sequences through the model: batch inputs (token ids, positions, slot mapping, block
//! tables) and a simple offline generator that drives many sequences through one forward pass.

mod backend;
mod batch;
mod cpu_parallel;
mod host_only;
pub mod generate;

pub use self::backend::{CpuBackend, FaultyBackend, HostPipeline, ModelBackend};
pub use self::cpu_parallel::CpuTensorParallelBackend;
pub use self::host_only::HostOnlyBackend;
pub use self::batch::{BatchError, FedToken, ForwardBatch, SeqInBatch, PLACEHOLDER_TOKEN};
