//! Model definitions and loading: the model specification (`config`), one file per architecture
//! (`arch`) written over the backend operations (`ops`), weight sources (GGUF files, Hugging Face
//! directories, deterministic dummy weights), tensor parallelism's shard plan (`parallel`), and
//! the CPU backend, the reference forward.

pub mod arch;
pub mod config;
pub mod fp8;
pub mod cpu;
pub mod gguf;
pub mod ops;
pub mod parallel;
pub mod rope;
pub mod sources;
pub mod weights;

use std::path::{Path, PathBuf};

pub use self::arch::Arch;
pub use self::config::{ModelConfig, RopeScaling};
pub use self::weights::{Tensor, WeightSource};

/// Errors of model loading, one enum for the subsystem; messages name the file, key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("invalid model file: {0}")]
    Format(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tensor `{0}` is missing from the checkpoint")]
    MissingTensor(String),
    #[error("invalid forward input: {0}")]
    Input(String),
    /// A backend failed to run an operation (a device error, or a bug it caught).
    #[error("{0}")]
    Backend(String),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}
