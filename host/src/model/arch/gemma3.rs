//! `Gemma3ForCausalLM` (text only): the shared decoder with Gemma's choices. Norms multiply by
//! `1 + w`; every block has a norm before and after it (`input_layernorm` and
//! `post_attention_layernorm` around attention, `pre_feedforward_layernorm` and
//! `post_feedforward_layernorm` around the MLP); q/k norms; embeddings scaled by sqrt(hidden);
//! GELU-tanh; scores scaled by `query_pre_attn_scalar ** -0.5`; the final logits soft-capped
//! when configured. Layers alternate between a
//! sliding window with their own unscaled RoPE base (`rope_local_base_freq`) and global
//! attention with the scaled one (five local to one global by default).
//!
//! llama.cpp's converter stores Gemma's norm weights with the 1 already added; `from_gguf_layout`
//! takes it off again.

use super::decoder::Naming;
use super::gguf_meta::GgufMeta;
use super::hf::HfConfig;
use super::Arch;
use crate::model::config::{Activation, LayerType};
use crate::model::weights::Tensor;
use crate::model::{ModelConfig, ModelError};

pub const NAMING: Naming = Naming {
    fused_qkv: false,
    fused_gate_up: false,
    ffn_norm: "pre_feedforward_layernorm",
    post_attn_norm: "post_attention_layernorm",
    post_ffn_norm: "post_feedforward_layernorm",
};

/// Gemma 3's default: every sixth layer is global.
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;

fn gemma_choices(c: &mut ModelConfig) {
    c.norm_unit_offset = true;
    c.qk_norm = true;
    c.sandwich_norms = true;
    c.embedding_multiplier = Some((c.hidden_size as f32).sqrt());
}

fn pattern_layers(num_layers: usize, pattern: usize) -> Vec<LayerType> {
    (0..num_layers)
        .map(|i| if pattern > 0 && (i + 1) % pattern == 0 { LayerType::Full } else { LayerType::Sliding })
        .collect()
}

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    let mut c = hf.decoder(Arch::Gemma3, true, 131072)?;
    gemma_choices(&mut c);
    c.hidden_act = hf.activation(Activation::GeluTanh)?;
    c.query_scale = hf.opt_f32("query_pre_attn_scalar").unwrap_or(256.0).powf(-0.5);
    // Gemma 3 keeps `attn_logit_softcapping` in its config but, unlike Gemma 2, does not apply it
    // (transformers' Gemma3Attention never passes it on; vLLM neither): it is ignored here too.
    c.attn_logit_softcapping = None;
    c.final_logit_softcapping = hf.opt_f32("final_logit_softcapping");
    c.rope_theta = hf.rope_theta("full_attention").or(hf.opt_f32("rope_theta")).unwrap_or(1_000_000.0);
    c.rope_local_theta = Some(hf.rope_theta("sliding_attention").or(hf.opt_f32("rope_local_base_freq")).unwrap_or(10_000.0));
    if hf.rope_scaling("sliding_attention", c.max_position_embeddings)?.is_some() && hf.get("rope_parameters").is_some() {
        return Err(ModelError::Unsupported("config.json: RoPE scaling on Gemma 3's sliding layers".into()));
    }
    if hf.layer_types()?.is_none() {
        let pattern = hf.opt_usize("sliding_window_pattern").or(hf.opt_usize("_sliding_window_pattern"));
        c.layer_types = pattern_layers(c.num_hidden_layers, pattern.unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN));
    }
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Gemma3)?;
    gemma_choices(&mut c);
    c.hidden_act = Activation::GeluTanh;
    // llama.cpp: the 27B model (62 layers) scales by hidden / heads, the others by head_dim.
    let scalar = if c.num_hidden_layers == 62 { c.hidden_size / c.num_attention_heads } else { c.head_dim };
    c.query_scale = (scalar as f32).powf(-0.5);
    c.rope_local_theta = Some(10_000.0);
    let pattern = meta.opt_usize("attention.sliding_window_pattern").unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN);
    c.layer_types = pattern_layers(c.num_hidden_layers, pattern);
    Ok(c)
}

/// llama.cpp's names for Gemma's sandwich norms (the rest are shared).
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let gguf = match part {
        "post_attention_layernorm.weight" => "post_attention_norm",
        "pre_feedforward_layernorm.weight" => "ffn_norm",
        "post_feedforward_layernorm.weight" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}.weight"))
}

pub fn from_gguf_layout(hf_name: &str, tensor: &mut Tensor) {
    if hf_name.ends_with("norm.weight") {
        for v in &mut tensor.data {
            *v -= 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_gemma3_configs_of_both_transformers_versions() {
        let v4 = json!({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 100, "sliding_window": 8, "query_pre_attn_scalar": 64, "rope_theta": 1e6,
            "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6});
        let c = Arch::Gemma3.config_from_hf(&HfConfig::new(v4)).unwrap();
        assert!(c.norm_unit_offset && c.qk_norm && c.sandwich_norms && c.tie_word_embeddings);
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(c.embedding_multiplier, Some(8.0));
        assert_eq!(c.query_scale, 0.125);
        assert_eq!(c.layer_attention(0).window, Some(8));
        assert_eq!(c.layer_attention(0).rope, 1);
        assert_eq!(c.layer_attention(5).window, None);
        assert_eq!(c.layer_attention(6).window, Some(8));
        assert_eq!(c.rope_scaling, Some(crate::model::RopeScaling::Linear { factor: 8.0 }));
        let v5 = json!({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 100, "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"],
            "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}});
        let c = Arch::Gemma3.config_from_hf(&HfConfig::new(v5)).unwrap();
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!((c.layer_attention(0).window, c.layer_attention(1).window), (None, Some(8)));
    }
}
