//! `MistralForCausalLM`: Llama's decoder with a sliding window on every layer (Mistral 7B v0.1's
//! 4096 positions; later versions set none). Blocks wholly outside the window are given back by
//! the engine (`ModelConfig::all_layers_sliding`). llama.cpp stores Mistral GGUFs as `llama`.

use super::hf::{window_on_every_layer, HfConfig};
use super::Arch;
use crate::model::{ModelConfig, ModelError};

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    let mut c = hf.decoder(Arch::Mistral, false, 32768)?;
    window_on_every_layer(&mut c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LayerType;
    use serde_json::json;

    #[test]
    fn the_window_applies_to_every_layer_unless_it_covers_the_context() {
        let mut j = json!({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 4096, "sliding_window": 32});
        let c = Arch::Mistral.config_from_hf(&HfConfig::new(j.clone())).unwrap();
        assert_eq!(c.layer_types, vec![LayerType::Sliding; 2]);
        assert_eq!(c.all_layers_sliding(), Some(32));
        j["sliding_window"] = json!(4096);
        let c = Arch::Mistral.config_from_hf(&HfConfig::new(j)).unwrap();
        assert_eq!((c.sliding_window, c.layer_attention(0).window), (None, None));
    }
}
