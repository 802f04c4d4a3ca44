//! GGUF files (versions 2 and 3): metadata, tensor infos and memory-mapped tensor data.
//!
//! [`GgufFile`] is the public entry point: it parses and validates the whole header at open
//! (`reader`), keeps the bytes memory-mapped, and hands out raw tensor bytes or f32 tensors
//! (`dequant`). Metadata values are [`GgufValue`]s (`value`), element types [`GgmlType`]s
//! (`types`), and every failure is a [`GgufError`] (`error`).

mod dequant;
mod error;
mod reader;
mod types;
mod value;

#[cfg(test)]
pub(crate) mod test_writer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

pub use dequant::{can_dequantize, dequantize};
pub use error::GgufError;
pub use reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
pub use types::GgmlType;
pub use value::GgufValue;

/// Where a tensor lives, as described by the file's tensor info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `shape[0]` is `ne0`, the innermost (contiguous) dimension.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Product of the dimensions (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of tensor data: whole blocks of the tensor's type.
    pub fn n_bytes(&self) -> usize {
        (self.n_elements() / self.ggml_type.block_size()).saturating_mul(self.ggml_type.type_size())
    }
}

/// The bytes of a GGUF file: memory-mapped, or owned.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open, fully validated GGUF file.
pub struct GgufFile {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    storage: Storage,
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`. The file must not be modified while open.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; parsing reports the truncation.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only; like every mmap-based loader we rely on the file
            // not being truncated or rewritten while it is open.
            Storage::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::from_storage(storage)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<GgufFile, GgufError> {
        let p = reader::parse(storage.bytes())?;
        Ok(GgufFile {
            version: p.version,
            metadata: p.metadata,
            tensors: p.tensors,
            index: p.index,
            alignment: p.alignment,
            data_offset: p.data_offset,
            storage,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file (its range was validated at open). For an info
    /// that does not describe data inside this file, returns an empty slice.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|s| Some((s, s.checked_add(info.n_bytes() as u64)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }

    /// The whole tensor `name` as f32, in ggml order (`ne0` innermost): a 2-D `[ne0, ne1]`
    /// tensor is `ne1` rows of `ne0` values.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let n = info.n_elements();
        if !can_dequantize(info.ggml_type) {
            return Err(GgufError::UnsupportedDequant {
                context: format!("tensor `{name}`"),
                ty: info.ggml_type,
            });
        }
        let mut out = vec![0f32; n];
        dequantize(info.ggml_type, self.tensor_data(info), n, &mut out)?;
        Ok(out)
    }

    /// Part `part` of `parts` equal contiguous parts of tensor `name` (one expert of a stacked
    /// `[experts, rows, cols]` tensor), as f32: only that part is dequantized.
    pub fn dequantize_part(&self, name: &str, part: usize, parts: usize) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let ty = info.ggml_type;
        if !can_dequantize(ty) {
            return Err(GgufError::UnsupportedDequant { context: format!("tensor `{name}`"), ty });
        }
        let n = info.n_elements();
        let blocks = n / ty.block_size();
        if parts == 0 || part >= parts || !blocks.is_multiple_of(parts) {
            return Err(GgufError::DequantSize {
                ty,
                detail: format!("`{name}` ({n} elements) does not split into {parts} parts of whole blocks"),
            });
        }
        let part_bytes = blocks / parts * ty.type_size();
        let bytes = self.tensor_data(info);
        let bytes = bytes.get(part * part_bytes..(part + 1) * part_bytes).unwrap_or(&[]);
        let mut out = vec![0f32; n / parts];
        dequantize(ty, bytes, n / parts, &mut out)?;
        Ok(out)
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Any integer value that fits an i64.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// Any float or integer value, as f64.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// Any float or integer value, as f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get_f64(key).map(|v| v as f32)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key)?.as_array()
    }

    /// An array of strings (`None` if any element is not a string).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get_array(key)?.iter().map(GgufValue::as_str).collect()
    }

    /// An array of numbers, as f32 (`None` if any element is not a number).
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect()
    }

    /// An array of integers, as i64 (`None` if any element is not an integer fitting i64).
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        self.get_array(key)?.iter().map(GgufValue::as_i64).collect()
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("size", &self.storage.bytes().len())
            .finish()
    }
}
