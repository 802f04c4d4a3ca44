//! The one error type of the GGUF reader, [`GgufError`]. Every message names what was wrong and
//! where (byte offset, metadata key or tensor name), so a corrupt file can be diagnosed from the
//! message alone.

use std::path::PathBuf;

use super::types::GgmlType;

/// Everything that can go wrong while opening a GGUF file or dequantizing its tensors.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or memory-mapped.
    #[error("cannot read GGUF file `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: the magic is {found:?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },

    /// A version other than 2 or 3.
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),

    /// The file ends in the middle of something.
    #[error("file truncated: {what} at byte {offset} needs {needed} bytes, but the file has only {size}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        size: u64,
    },

    /// A count (tensors, metadata entries, array elements, string length) that cannot possibly
    /// fit in what is left of the file.
    #[error("{what}: count {count} cannot fit in the {remaining} bytes left in the file (at byte {offset})")]
    ImpossibleCount {
        what: String,
        count: u64,
        offset: u64,
        remaining: u64,
    },

    /// A string that is not valid UTF-8.
    #[error("{what}: string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },

    /// A metadata value type id outside 0..=12.
    #[error("{what}: unknown metadata value type {id} at byte {offset}")]
    UnknownValueType { what: String, id: u32, offset: u64 },

    /// Arrays nested deeper than the reader accepts.
    #[error("{what}: arrays nested more than {limit} deep")]
    NestingTooDeep { what: String, limit: usize },

    /// The same metadata key twice.
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),

    /// A metadata value with the wrong type or an invalid value (e.g. `general.alignment`).
    #[error("metadata key `{key}`: {detail}")]
    BadMetadata { key: String, detail: String },

    /// The same tensor name twice.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),

    /// A tensor whose type id is not a known ggml type.
    #[error("tensor `{name}`: unknown ggml type id {id}")]
    UnknownGgmlType { name: String, id: u32 },

    /// A tensor info that is inconsistent (dimensions, alignment, data range, ...).
    #[error("tensor `{name}`: {detail}")]
    BadTensor { name: String, detail: String },

    /// [`GgufFile::dequantize`](super::GgufFile::dequantize) for a name the file does not have.
    #[error("no tensor named `{0}` in the GGUF file")]
    TensorNotFound(String),

    /// A ggml type this reader cannot convert to f32. `context` names the tensor where known.
    #[error("{context}: dequantizing {ty} is not supported")]
    UnsupportedDequant { context: String, ty: GgmlType },

    /// Inconsistent buffer sizes passed to [`dequantize`](super::dequantize).
    #[error("dequantize {ty}: {detail}")]
    DequantSize { ty: GgmlType, detail: String },
}
