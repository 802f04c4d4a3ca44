//! `Phi3ForCausalLM`: Phi-3 and Phi-3.5/4-mini. Llama's decoder with the Q, K and V projections
//! stored as one `qkv_proj` and the gate and up projections as one `gate_up_proj` (gate rows
//! first), a sliding window on every layer when the config sets one shorter than the context
//! (Phi-3-mini-4k: 2047), and partial rotary embeddings (`partial_rotary_factor`). The
//! `longrope` scaling of the 128k variants is refused by name.

use super::decoder::Naming;
use super::gguf_meta::GgufMeta;
use super::hf::{window_on_every_layer, HfConfig};
use super::Arch;
use crate::model::{ModelConfig, ModelError};

pub const NAMING: Naming = Naming { fused_qkv: true, fused_gate_up: true, ..super::decoder::LLAMA_NAMING };

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    let mut c = hf.decoder(Arch::Phi3, false, 4096)?;
    window_on_every_layer(&mut c);
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Phi3)?;
    window_on_every_layer(&mut c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_partial_rotary_and_refuses_longrope() {
        let mut j = json!({"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
            "max_position_embeddings": 4096, "sliding_window": 2047, "partial_rotary_factor": 0.75});
        let c = Arch::Phi3.config_from_hf(&HfConfig::new(j.clone())).unwrap();
        assert_eq!((c.rotary_dim, c.layer_attention(1).window), (12, Some(2047)));
        j["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
        let err = Arch::Phi3.config_from_hf(&HfConfig::new(j)).unwrap_err().to_string();
        assert!(err.contains("longrope"), "{err}");
    }
}
