//! The Llama-family model configuration: one struct for Llama 2/3, Mistral, Qwen2 and SmolLM2,
//! read from a Hugging Face `config.json` or from GGUF metadata (`{arch}.*` keys).
//!
//! Invariants kept by `validate`: every size is non-zero, the query heads are a multiple of the
//! key/value heads (grouped-query attention), and the head dimension is even (RoPE rotates pairs).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ModelError;

/// How rotary position embeddings stretch to contexts longer than the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear { factor: f32 },
    /// Explicit per-frequency divisors (llama.cpp's `rope_freqs.weight` tensor in Llama 3.1 GGUFs).
    FreqFactors { factors: Vec<f32> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2` (SmolLM2 is `llama`).
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the Q, K and V projections (Qwen2).
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads per key/value head.
    pub fn gqa_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = h * (self.q_size() + 2 * self.kv_size())
            + self.q_size() * h
            + 3 * h * self.intermediate_size
            + 2 * h
            + if self.attention_bias { self.q_size() + 2 * self.kv_size() } else { 0 };
        let embeddings = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        embeddings + per_layer * self.num_hidden_layers + h
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(ModelError::Config(format!("`{name}` must be positive, got 0")));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::Config(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!("`head_dim` must be even, got {}", self.head_dim)));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 || self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(ModelError::Config(
                "`rms_norm_eps` and `rope_theta` must be positive".to_string(),
            ));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &Value) -> Result<Self, ModelError> {
        let get_usize = |key: &str| -> Result<usize, ModelError> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is missing or not an integer")))
        };
        let opt_usize = |key: &str| json.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let opt_f32 = |key: &str| json.get(key).and_then(Value::as_f64).map(|v| v as f32);

        let architecture = json
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        if !matches!(architecture.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ModelError::Unsupported(format!(
                "config.json: model_type `{architecture}` (supported: llama, mistral, qwen2)"
            )));
        }
        let hidden_size = get_usize("hidden_size")?;
        let num_attention_heads = get_usize("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        let rope_theta = opt_f32("rope_theta")
            .or_else(|| {
                json.get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .map(|v| v as f32)
            })
            .unwrap_or(10_000.0);
        let rope_scaling = match json.get("rope_scaling").or_else(|| json.get("rope_parameters")) {
            Some(scaling) if scaling.is_object() => parse_hf_rope_scaling(scaling)?,
            _ => None,
        };
        let eos_token_ids = match json.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => Vec::new(),
        };
        // Qwen2 always has Q/K/V biases; Llama's `attention_bias` also puts one on the output
        // projection, and `mlp_bias` on the MLP, which this implementation does not carry.
        let attention_bias = architecture == "qwen2";
        for key in ["attention_bias", "mlp_bias"] {
            if !attention_bias && json.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(ModelError::Unsupported(format!("config.json: `{key}: true` for model_type {architecture}")));
            }
        }
        let default_max_positions = if architecture == "llama" { 2048 } else { 32768 };
        let config = ModelConfig {
            attention_bias,
            architecture,
            hidden_size,
            intermediate_size: get_usize("intermediate_size")?,
            num_hidden_layers: get_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: get_usize("vocab_size")?,
            rms_norm_eps: opt_f32("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(default_max_positions),
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: json.get("bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }
}

fn parse_hf_rope_scaling(scaling: &Value) -> Result<Option<RopeScaling>, ModelError> {
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |key: &str| scaling.get(key).and_then(Value::as_f64).map(|v| v as f32);
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor").ok_or_else(|| ModelError::Config("rope_scaling: `factor` is missing".into()))?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: scaling
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(8192) as usize,
        })),
        other => Err(ModelError::Unsupported(format!("rope_scaling type `{other}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm2_json() -> Value {
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
        let c = ModelConfig::from_hf_json(&smollm2_json()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.gqa_group_size(), 3);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        // SmolLM2-135M has about 134.5M parameters.
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn reads_llama3_rope_scaling_and_qwen2_bias() {
        let mut j = smollm2_json();
        j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        j["model_type"] = json!("qwen2");
        assert!(ModelConfig::from_hf_json(&j).unwrap().attention_bias);
        j["model_type"] = json!("llama");
        j["attention_bias"] = json!(true);
        let err = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(err.contains("attention_bias"), "{err}");
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        let mut j = smollm2_json();
        j["num_key_value_heads"] = json!(2);
        let err = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let mut j = smollm2_json();
        j.as_object_mut().unwrap().remove("hidden_size");
        let err = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
        let mut j = smollm2_json();
        j["model_type"] = json!("gpt_neox");
        assert!(ModelConfig::from_hf_json(&j).is_err());
    }
}
