//! The supported architectures: one file each, and the one table that maps a Hugging Face
//! `config.json` (`architectures` / `model_type`) or a GGUF `general.architecture` to it.
//!
//! An architecture file owns three things: how its config (HF fields, GGUF metadata) becomes a
//! `ModelConfig`, which tensors it loads under which names, and its forward, written once over
//! `model::ops::Ops` so that every backend runs it. Most reuse the pre-norm decoder of
//! `decoder.rs` and differ only in configuration and tensor names.

pub mod decoder;
pub mod gemma3;
pub mod gguf_meta;
pub mod hf;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;

use serde::{Deserialize, Serialize};

use self::gguf_meta::GgufMeta;
use self::hf::HfConfig;
use super::gguf::GgufFile;
use super::ops::Ops;
use self::decoder::Naming;
use super::weights::{Loader, ModelWeights, Tensor, WeightStore};
use super::{ModelConfig, ModelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
    Qwen3Moe,
}

/// How each architecture is named in the formats it loads from.
pub struct ArchNames {
    pub arch: Arch,
    /// `architectures[0]` of `config.json`.
    pub hf_class: &'static str,
    /// `model_type` of `config.json`.
    pub model_type: &'static str,
    /// `general.architecture` of a GGUF file (llama.cpp stores Mistral as `llama`).
    pub gguf: Option<&'static str>,
}

pub const ARCHITECTURES: &[ArchNames] = &[
    ArchNames { arch: Arch::Llama, hf_class: "LlamaForCausalLM", model_type: "llama", gguf: Some("llama") },
    ArchNames { arch: Arch::Mistral, hf_class: "MistralForCausalLM", model_type: "mistral", gguf: None },
    ArchNames { arch: Arch::Qwen2, hf_class: "Qwen2ForCausalLM", model_type: "qwen2", gguf: Some("qwen2") },
    ArchNames { arch: Arch::Qwen3, hf_class: "Qwen3ForCausalLM", model_type: "qwen3", gguf: Some("qwen3") },
    ArchNames { arch: Arch::Gemma3, hf_class: "Gemma3ForCausalLM", model_type: "gemma3_text", gguf: Some("gemma3") },
    ArchNames { arch: Arch::Phi3, hf_class: "Phi3ForCausalLM", model_type: "phi3", gguf: Some("phi3") },
    ArchNames { arch: Arch::Qwen3Moe, hf_class: "Qwen3MoeForCausalLM", model_type: "qwen3_moe", gguf: Some("qwen3moe") },
];

fn supported_list(name: impl Fn(&ArchNames) -> Option<&'static str>) -> String {
    ARCHITECTURES.iter().filter_map(name).collect::<Vec<_>>().join(", ")
}

impl Arch {
    pub fn names(self) -> &'static ArchNames {
        ARCHITECTURES.iter().find(|a| a.arch == self).expect("every architecture is in the table")
    }

    /// The architecture a `config.json` names: by its class, else by its `model_type`.
    pub fn from_hf(hf: &HfConfig) -> Result<Arch, ModelError> {
        let class = hf.json().get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
        let model_type = hf.json().get("model_type").and_then(|m| m.as_str());
        if let Some(found) = ARCHITECTURES.iter().find(|a| Some(a.hf_class) == class) {
            return Ok(found.arch);
        }
        if class.is_none() {
            if let Some(found) = ARCHITECTURES.iter().find(|a| Some(a.model_type) == model_type) {
                return Ok(found.arch);
            }
            if model_type.is_none() {
                // A bare config (dummy weights): Llama, as transformers' default.
                return Ok(Arch::Llama);
            }
        }
        let named = class.or(model_type).unwrap_or_default();
        Err(ModelError::Unsupported(format!(
            "config.json: architecture `{named}` (supported: {})",
            supported_list(|a| Some(a.hf_class))
        )))
    }

    pub fn from_gguf(name: &str) -> Result<Arch, ModelError> {
        ARCHITECTURES.iter().find(|a| a.gguf == Some(name)).map(|a| a.arch).ok_or_else(|| {
            ModelError::Unsupported(format!("GGUF architecture `{name}` (supported: {})", supported_list(|a| a.gguf)))
        })
    }

    /// The model configuration of a `config.json`.
    pub fn config_from_hf(self, hf: &HfConfig) -> Result<ModelConfig, ModelError> {
        let config = match self {
            Arch::Llama => llama::config_from_hf(hf),
            Arch::Mistral => mistral::config_from_hf(hf),
            Arch::Qwen2 => qwen2::config_from_hf(hf),
            Arch::Qwen3 => qwen3::config_from_hf(hf),
            Arch::Gemma3 => gemma3::config_from_hf(hf),
            Arch::Phi3 => phi3::config_from_hf(hf),
            Arch::Qwen3Moe => qwen3_moe::config_from_hf(hf),
        }?;
        config.validate()?;
        Ok(config)
    }

    /// The model configuration of a GGUF file's `{arch}.*` metadata.
    pub fn config_from_gguf(self, file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let meta = GgufMeta::new(file, self.names().gguf.unwrap_or("llama"));
        let config = match self {
            Arch::Llama | Arch::Mistral => llama::config_from_gguf(&meta),
            Arch::Qwen2 => qwen2::config_from_gguf(&meta),
            Arch::Qwen3 => qwen3::config_from_gguf(&meta),
            Arch::Gemma3 => gemma3::config_from_gguf(&meta),
            Arch::Phi3 => phi3::config_from_gguf(&meta),
            Arch::Qwen3Moe => qwen3_moe::config_from_gguf(&meta),
        }?;
        config.validate()?;
        Ok(config)
    }

    /// llama.cpp's name for a Hugging Face tensor name of this architecture, with the part of a
    /// stacked expert tensor it is (see `gguf_meta::gguf_tensor_name`).
    pub fn gguf_tensor_name(self, hf_name: &str) -> Option<(String, Option<usize>)> {
        let overridden = match self {
            Arch::Gemma3 => gemma3::gguf_tensor_name(hf_name),
            _ => None,
        };
        overridden.map(|name| (name, None)).or_else(|| gguf_meta::gguf_tensor_name(hf_name))
    }

    /// Turns a tensor as llama.cpp's converter stored it back into Hugging Face's form.
    pub fn from_gguf_layout(self, config: &ModelConfig, hf_name: &str, tensor: &mut Tensor) {
        match self {
            Arch::Llama | Arch::Mistral => llama::from_gguf_layout(config, hf_name, tensor),
            Arch::Gemma3 => gemma3::from_gguf_layout(hf_name, tensor),
            _ => {}
        }
    }

    /// The head dimension of the interleaved Q/K rows of `hf_name` in a GGUF file (llama.cpp
    /// permutes Llama's query and key projections for its RoPE), if it has them: what
    /// `from_gguf_layout` undoes, for a store that converts stored blocks itself.
    pub fn gguf_interleaved_qk_head_dim(self, config: &ModelConfig, hf_name: &str) -> Option<usize> {
        match self {
            Arch::Llama | Arch::Mistral => llama::interleaved_qk_heads(config, hf_name).map(|_| config.head_dim),
            _ => None,
        }
    }

    /// The tensor names that differ from Llama's.
    pub fn naming(self) -> &'static Naming {
        match self {
            Arch::Phi3 => &phi3::NAMING,
            Arch::Gemma3 => &gemma3::NAMING,
            _ => &decoder::LLAMA_NAMING,
        }
    }

    /// Every weight of the model, from the loader's source into its store.
    pub fn load<S: WeightStore>(self, config: &ModelConfig, loader: &mut Loader<'_, S>) -> Result<ModelWeights<S::Family>, ModelError> {
        decoder::load(config, self.naming(), loader)
    }

    /// The forward of one batch (see `Ops` for what the backend does with it). Every supported
    /// architecture is an instance of the shared decoder.
    pub fn forward<O: Ops>(self, config: &ModelConfig, weights: &ModelWeights<O::Family>, ops: &mut O) -> Result<(), ModelError> {
        decoder::forward(config, weights, ops)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.names().hf_class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn architectures_are_found_by_class_then_model_type_and_unknown_ones_are_listed() {
        let hf = |v: serde_json::Value| HfConfig::new(v);
        assert_eq!(Arch::from_hf(&hf(json!({"architectures": ["Qwen3ForCausalLM"]}))).unwrap(), Arch::Qwen3);
        assert_eq!(Arch::from_hf(&hf(json!({"model_type": "gemma3_text"}))).unwrap(), Arch::Gemma3);
        assert_eq!(Arch::from_hf(&hf(json!({}))).unwrap(), Arch::Llama);
        let err = Arch::from_hf(&hf(json!({"architectures": ["GPTNeoXForCausalLM"]}))).unwrap_err().to_string();
        assert!(err.contains("GPTNeoXForCausalLM") && err.contains("Qwen3MoeForCausalLM") && err.contains("Phi3ForCausalLM"), "{err}");
        let err = Arch::from_gguf("falcon").unwrap_err().to_string();
        assert!(err.contains("falcon") && err.contains("qwen3moe"), "{err}");
        for names in ARCHITECTURES {
            assert_eq!(names.arch.names().hf_class, names.hf_class);
        }
    }
}
