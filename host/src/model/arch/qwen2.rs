//! `Qwen2ForCausalLM`: Qwen2 and Qwen2.5. Llama's decoder with biases on the Q, K and V
//! projections (always: the config has no switch), and a sliding window only on the layers from
//! `max_window_layers` on when `use_sliding_window` is set (no released checkpoint sets it).

use super::gguf_meta::GgufMeta;
use super::hf::HfConfig;
use super::Arch;
use crate::model::config::LayerType;
use crate::model::{ModelConfig, ModelError};

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    let mut c = hf.decoder(Arch::Qwen2, false, 32768)?;
    c.attention_bias = true;
    qwen_windows(hf, &mut c)?;
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Qwen2)?;
    c.sliding_window = None;
    Ok(c)
}

/// Qwen2's and Qwen3's window rule: `layer_types` when listed, else sliding from layer
/// `max_window_layers` on, and only with `use_sliding_window`.
pub fn qwen_windows(hf: &HfConfig, c: &mut ModelConfig) -> Result<(), ModelError> {
    if hf.opt_bool("use_sliding_window") != Some(true) {
        c.sliding_window = None;
        c.layer_types = vec![LayerType::Full; c.num_hidden_layers];
        return Ok(());
    }
    if hf.layer_types()?.is_none() {
        let from = hf.opt_usize("max_window_layers").unwrap_or(c.num_hidden_layers);
        c.layer_types = (0..c.num_hidden_layers).map(|i| if i >= from { LayerType::Sliding } else { LayerType::Full }).collect();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn biases_always_and_windows_only_when_switched_on() {
        let mut j = json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "sliding_window": 32, "use_sliding_window": false, "max_window_layers": 2});
        let c = Arch::Qwen2.config_from_hf(&HfConfig::new(j.clone())).unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.sliding_window, None);
        j["use_sliding_window"] = json!(true);
        let c = Arch::Qwen2.config_from_hf(&HfConfig::new(j)).unwrap();
        assert_eq!(c.layer_types, vec![LayerType::Full, LayerType::Full, LayerType::Sliding, LayerType::Sliding]);
        assert_eq!(c.layer_attention(3).window, Some(32));
    }
}
