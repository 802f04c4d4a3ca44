//! `LlamaForCausalLM`: Llama 2 and 3.x, SmolLM2. The plain pre-norm decoder with SwiGLU and
//! grouped-query attention, RoPE with Llama 3 or linear scaling.
//!
//! In GGUF, llama.cpp stores Mistral as `llama` too, and permutes the Q and K rows so that RoPE
//! rotates adjacent pairs; `from_gguf_layout` undoes that, so every backend sees Hugging Face's
//! rotate-half layout.

use super::gguf_meta::GgufMeta;
use super::hf::{window_on_every_layer, HfConfig};
use super::Arch;
use crate::model::weights::Tensor;
use crate::model::{ModelConfig, ModelError};

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    // Llama's `attention_bias` also puts a bias on the output projection, and `mlp_bias` on the
    // MLP, which the decoder does not carry.
    hf.refuse_true("attention_bias", Arch::Llama)?;
    hf.refuse_true("mlp_bias", Arch::Llama)?;
    let mut c = hf.decoder(Arch::Llama, false, 2048)?;
    c.sliding_window = None;
    window_on_every_layer(&mut c);
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Llama)?;
    window_on_every_layer(&mut c);
    Ok(c)
}

pub fn from_gguf_layout(config: &ModelConfig, hf_name: &str, tensor: &mut Tensor) {
    let row_len = if tensor.shape.len() == 2 { tensor.shape[1] } else { 1 };
    if let Some(heads) = interleaved_qk_heads(config, hf_name) {
        tensor.data = unpermute_qk_rows(&tensor.data, heads, row_len);
    }
}

/// How many heads of rows `hf_name` holds in llama.cpp's interleaved Q/K order: the query and
/// key projections (and their biases).
pub fn interleaved_qk_heads(config: &ModelConfig, hf_name: &str) -> Option<usize> {
    if hf_name.contains("self_attn.q_proj") {
        Some(config.num_attention_heads)
    } else if hf_name.contains("self_attn.k_proj") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's `permute` of Q/K rows: within each head, GGUF row `2i + j` holds Hugging
/// Face row `j * head_dim / 2 + i` (`j` in {0, 1}). Works on weights (`row_len` = in-features)
/// and on biases (`row_len` = 1).
pub(crate) fn unpermute_qk_rows<T: Copy + Default>(data: &[T], num_heads: usize, row_len: usize) -> Vec<T> {
    let rows = data.len() / row_len;
    let head_dim = rows / num_heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for head in 0..num_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = head * head_dim + 2 * i + j;
                let dst = head * head_dim + j * half + i;
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm2_json() -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2
        })
    }

    #[test]
    fn reads_smollm2_config() {
        let c = Arch::Llama.config_from_hf(&HfConfig::new(smollm2_json())).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.gqa_group_size(), 3);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        // SmolLM2-135M has about 134.5M parameters.
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn reads_llama3_rope_scaling_and_refuses_biases() {
        let mut j = smollm2_json();
        j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = Arch::Llama.config_from_hf(&HfConfig::new(j.clone())).unwrap();
        assert!(matches!(c.rope_scaling, Some(crate::model::RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        j["attention_bias"] = json!(true);
        let err = Arch::Llama.config_from_hf(&HfConfig::new(j)).unwrap_err().to_string();
        assert!(err.contains("attention_bias"), "{err}");
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        let mut j = smollm2_json();
        j["num_key_value_heads"] = json!(2);
        let err = Arch::Llama.config_from_hf(&HfConfig::new(j)).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut j = smollm2_json();
        j.as_object_mut().unwrap().remove("hidden_size");
        let err = Arch::Llama.config_from_hf(&HfConfig::new(j)).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    /// The permutation llama.cpp's converter applies (`convert_hf_to_gguf.py`, `LlamaModel.permute`):
    /// `w.reshape(n_head, 2, dim / n_head / 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    fn llama_cpp_permute(data: &[f32], num_heads: usize, row_len: usize) -> Vec<f32> {
        let rows = data.len() / row_len;
        let half = rows / num_heads / 2;
        let mut out = vec![0.0; data.len()];
        for head in 0..num_heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = (head * 2 + j) * half + i;
                    let dst = (head * half + i) * 2 + j;
                    out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, head_dim, row_len) = (3, 8, 5);
        let hf: Vec<f32> = (0..heads * head_dim * row_len).map(|v| v as f32).collect();
        let gguf = llama_cpp_permute(&hf, heads, row_len);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_qk_rows(&gguf, heads, row_len), hf);
        let bias: Vec<f32> = (0..heads * head_dim).map(|v| v as f32).collect();
        assert_eq!(unpermute_qk_rows(&llama_cpp_permute(&bias, heads, 1), heads, 1), bias);
    }
}
