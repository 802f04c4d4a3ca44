//! GGUF models: the architecture and its configuration from the file's metadata (see
//! `arch::Arch::config_from_gguf`), and weights under llama.cpp's tensor names, dequantized to
//! float32 and turned back into Hugging Face's layout (`Arch::from_gguf_layout`).

use std::path::Path;

use crate::model::gguf::{can_dequantize, GgmlType, GgufFile};
use crate::model::weights::{RawDtype, RawTensor};
use crate::model::{Arch, ModelConfig, ModelError, Tensor, WeightSource};

/// Whether a device store expands blocks of `ty` itself (`kernels/dequant.cu`): every type the
/// CPU dequantizes but the plain integer and float64 ones, which no weight matrix is stored as.
fn expands_on_device(ty: GgmlType) -> bool {
    can_dequantize(ty) && !matches!(ty, GgmlType::F64 | GgmlType::I8 | GgmlType::I16 | GgmlType::I32)
}

pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let name = file
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::Config("GGUF: `general.architecture` is missing".into()))?;
        let config = Arch::from_gguf(name)?.config_from_gguf(&file)?;
        Ok(GgufSource { file, config })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The model configuration from the `{arch}.*` metadata keys.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        Ok(self.config.clone())
    }
}

impl WeightSource for GgufSource {
    /// The stored blocks of a matrix (vectors go through `load`: Gemma's norms are changed
    /// there), whole rows of a type the device store expands.
    fn raw(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>, ModelError> {
        let arch = self.config.architecture;
        let Some((name, part)) = arch.gguf_tensor_name(hf_name) else { return Ok(None) };
        let Some(info) = self.file.tensor(&name) else { return Ok(None) };
        let ty = info.ggml_type;
        let mut shape: Vec<usize> = info.shape.iter().rev().copied().collect();
        let cols = shape.last().copied().unwrap_or(0);
        if !expands_on_device(ty) || hf_name.ends_with("norm.weight") || shape.len() < 2 || !cols.is_multiple_of(ty.block_size()) {
            return Ok(None);
        }
        let bytes = self.file.tensor_data(info);
        let bytes = match part {
            None => bytes,
            Some(expert) => {
                // One expert of a stacked `[experts, rows, cols]` tensor: a contiguous range.
                let experts = shape.remove(0);
                if expert >= experts || !bytes.len().is_multiple_of(experts) {
                    return Ok(None);
                }
                let each = bytes.len() / experts;
                &bytes[expert * each..(expert + 1) * each]
            }
        };
        let interleaved_qk_head_dim = arch.gguf_interleaved_qk_head_dim(&self.config, hf_name);
        Ok(Some(RawTensor { dtype: RawDtype::Ggml(ty), shape, bytes, interleaved_qk_head_dim }))
    }

    fn load(&self, hf_name: &str, _expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let arch = self.config.architecture;
        let Some((name, part)) = arch.gguf_tensor_name(hf_name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor(&name) else {
            return Ok(None);
        };
        // GGUF lists dimensions innermost first; Hugging Face outermost first.
        let mut shape: Vec<usize> = info.shape.iter().rev().copied().collect();
        let data = match part {
            None => self.file.dequantize(&name)?,
            Some(expert) => {
                // One expert of a stacked `[experts, rows, cols]` tensor.
                let experts = shape.first().copied().unwrap_or(0);
                if expert >= experts {
                    return Ok(None);
                }
                shape.remove(0);
                self.file.dequantize_part(&name, expert, experts)?
            }
        };
        let mut tensor = Tensor::new(shape, data)?;
        arch.from_gguf_layout(&self.config, hf_name, &mut tensor);
        Ok(Some(tensor))
    }
}

#[cfg(test)]
#[path = "gguf_arch_tests.rs"]
mod arch_tests;
