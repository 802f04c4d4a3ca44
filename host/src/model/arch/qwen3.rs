//! `Qwen3ForCausalLM`: Llama's decoder with an RMSNorm over every query and key head before
//! RoPE, no biases, and YaRN for long contexts.

use super::gguf_meta::GgufMeta;
use super::hf::HfConfig;
use super::qwen2::qwen_windows;
use super::Arch;
use crate::model::{ModelConfig, ModelError};

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    qwen3_family(hf, Arch::Qwen3)
}

/// What Qwen3 and Qwen3-MoE share.
pub fn qwen3_family(hf: &HfConfig, arch: Arch) -> Result<ModelConfig, ModelError> {
    // Qwen3's `attention_bias` also biases the output projection, which the decoder does not carry.
    hf.refuse_true("attention_bias", arch)?;
    let mut c = hf.decoder(arch, false, 32768)?;
    c.qk_norm = true;
    qwen_windows(hf, &mut c)?;
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Qwen3)?;
    c.qk_norm = true;
    c.sliding_window = None;
    Ok(c)
}
