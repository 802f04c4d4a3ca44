//! Reading a Hugging Face `config.json`: typed field access whose errors name the field, and the
//! fields every decoder architecture shares (sizes, norms, RoPE and its scaling, windows, special
//! tokens), in both the transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`)
//! spellings.

use serde_json::Value;

use super::Arch;
use crate::model::config::{Activation, LayerType};
use crate::model::{ModelConfig, ModelError, RopeScaling};

pub struct HfConfig {
    json: Value,
}

impl HfConfig {
    pub fn new(json: Value) -> Self {
        HfConfig { json }
    }

    pub fn json(&self) -> &Value {
        &self.json
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)
            .ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is missing or not an integer")))
    }

    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(Value::as_u64).map(|v| v as usize)
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(Value::as_f64).map(|v| v as f32)
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The RoPE parameters of transformers 5 (`rope_parameters`, possibly one set per layer
    /// type), else transformers 4's `rope_scaling`; `layer_type` picks a per-type set.
    fn rope_parameters(&self, layer_type: &str) -> Option<&Value> {
        match self.get("rope_parameters") {
            Some(p) if p.get(layer_type).is_some_and(Value::is_object) => p.get(layer_type),
            Some(p) if p.is_object() && !p.as_object().unwrap().values().any(Value::is_object) => Some(p),
            _ => self.get("rope_scaling").filter(|v| v.is_object()),
        }
    }

    /// The RoPE base of `layer_type` ("full_attention" or "sliding_attention").
    pub fn rope_theta(&self, layer_type: &str) -> Option<f32> {
        self.rope_parameters(layer_type)
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .map(|v| v as f32)
    }

    /// The RoPE scaling of `layer_type`, `None` for the default (unscaled) rotation.
    pub fn rope_scaling(&self, layer_type: &str, max_position_embeddings: usize) -> Result<Option<RopeScaling>, ModelError> {
        match self.rope_parameters(layer_type) {
            Some(p) => parse_rope_scaling(p, max_position_embeddings),
            None => Ok(None),
        }
    }

    /// `partial_rotary_factor` at the top level or among the RoPE parameters (default 1).
    pub fn partial_rotary_factor(&self) -> f32 {
        self.opt_f32("partial_rotary_factor")
            .or_else(|| {
                self.rope_parameters("full_attention")
                    .and_then(|p| p.get("partial_rotary_factor"))
                    .and_then(Value::as_f64)
                    .map(|v| v as f32)
            })
            .unwrap_or(1.0)
    }

    /// `eos_token_id`: one id or a list.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => Vec::new(),
        }
    }

    /// The activation named by `hidden_act` (or Gemma's `hidden_activation`).
    pub fn activation(&self, default: Activation) -> Result<Activation, ModelError> {
        match self.opt_str("hidden_activation").or_else(|| self.opt_str("hidden_act")) {
            None => Ok(default),
            Some("silu" | "swish") => Ok(Activation::Silu),
            Some("gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new") => Ok(Activation::GeluTanh),
            Some(other) => Err(ModelError::Unsupported(format!("config.json: `hidden_act` `{other}` (supported: silu, gelu_pytorch_tanh)"))),
        }
    }

    /// Refuses a flag this implementation does not carry (e.g. `mlp_bias: true`).
    pub fn refuse_true(&self, key: &str, arch: Arch) -> Result<(), ModelError> {
        if self.opt_bool(key) == Some(true) {
            return Err(ModelError::Unsupported(format!("config.json: `{key}: true` for {arch}")));
        }
        Ok(())
    }

    /// `layer_types` as listed (transformers 5 writes it for windowed models), if present.
    pub fn layer_types(&self) -> Result<Option<Vec<LayerType>>, ModelError> {
        let Some(list) = self.get("layer_types").and_then(Value::as_array) else {
            return Ok(None);
        };
        list.iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                other => Err(ModelError::Unsupported(format!("config.json: layer type {other:?} in `layer_types`"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The fields every decoder shares. `default_tied` is the class's `tie_word_embeddings`
    /// default; `default_max_positions` its `max_position_embeddings` default.
    pub fn decoder(&self, arch: Arch, default_tied: bool, default_max_positions: usize) -> Result<ModelConfig, ModelError> {
        let hidden_size = self.usize("hidden_size")?;
        let num_attention_heads = self.usize("num_attention_heads")?;
        let num_key_value_heads = self.opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = self.opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        let mut c = ModelConfig::dense(
            arch,
            hidden_size,
            self.usize("intermediate_size")?,
            self.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            self.usize("vocab_size")?,
        )?;
        c.rms_norm_eps = self.opt_f32("rms_norm_eps").unwrap_or(1e-6);
        c.max_position_embeddings = self.opt_usize("max_position_embeddings").unwrap_or(default_max_positions);
        c.rope_theta = self.rope_theta("full_attention").or(self.opt_f32("rope_theta")).unwrap_or(10_000.0);
        c.rope_scaling = self.rope_scaling("full_attention", c.max_position_embeddings)?;
        c.rotary_dim = ((head_dim as f32 * self.partial_rotary_factor()) as usize) & !1;
        c.tie_word_embeddings = self.opt_bool("tie_word_embeddings").unwrap_or(default_tied);
        c.bos_token_id = self.opt_usize("bos_token_id").map(|v| v as u32);
        c.eos_token_ids = self.eos_token_ids();
        c.hidden_act = self.activation(Activation::Silu)?;
        if let Some(types) = self.layer_types()? {
            c.layer_types = types;
        }
        c.sliding_window = self.opt_usize("sliding_window");
        Ok(c)
    }
}

/// Every layer sliding when `window` is set and shorter than the context (Mistral, Phi-3);
/// a window as long as the context changes nothing and is dropped.
pub fn window_on_every_layer(c: &mut ModelConfig) {
    match c.sliding_window {
        Some(w) if w < c.max_position_embeddings => c.layer_types = vec![LayerType::Sliding; c.num_hidden_layers],
        _ => {
            c.sliding_window = None;
            c.layer_types = vec![LayerType::Full; c.num_hidden_layers];
        }
    }
}

fn parse_rope_scaling(p: &Value, max_position_embeddings: usize) -> Result<Option<RopeScaling>, ModelError> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |key: &str| p.get(key).and_then(Value::as_f64).map(|v| v as f32);
    let original = p.get("original_max_position_embeddings").and_then(Value::as_u64).map(|v| v as usize);
    let factor = || f("factor").ok_or_else(|| ModelError::Config(format!("rope_scaling `{kind}`: `factor` is missing")));
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original.unwrap_or(8192),
        })),
        "yarn" => {
            let factor = factor()?;
            // transformers' `_compute_yarn_parameters`: the attention factor from `mscale`s when
            // both are given, else 0.1 ln(factor) + 1.
            let get_mscale = |scale: f32, mscale: f32| if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 };
            let attention_factor = match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(factor, m) / get_mscale(factor, all),
                _ => get_mscale(factor, 1.0),
            };
            Ok(Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original.unwrap_or(max_position_embeddings),
                beta_fast: f("beta_fast").unwrap_or(32.0),
                beta_slow: f("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }))
        }
        other => Err(ModelError::Unsupported(format!("rope scaling type `{other}` (supported: linear, llama3, yarn)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_rope_in_both_transformers_spellings() {
        let v4 = HfConfig::new(json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}));
        assert_eq!(v4.rope_theta("full_attention"), None);
        assert_eq!(v4.rope_scaling("full_attention", 100).unwrap(), Some(RopeScaling::Linear { factor: 4.0 }));
        let v5 = HfConfig::new(json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}}));
        assert_eq!(v5.rope_theta("full_attention"), Some(1e6));
        match v5.rope_scaling("full_attention", 131072).unwrap() {
            Some(RopeScaling::Yarn { factor, original_max_position_embeddings, attention_factor, beta_fast, .. }) => {
                assert_eq!((factor, original_max_position_embeddings, beta_fast), (4.0, 32768, 32.0));
                assert!((attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
            }
            other => panic!("{other:?}"),
        }
        let per_type = HfConfig::new(json!({"rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}));
        assert_eq!(per_type.rope_theta("sliding_attention"), Some(1e4));
        assert_eq!(per_type.rope_scaling("sliding_attention", 10).unwrap(), None);
        assert_eq!(per_type.rope_scaling("full_attention", 10).unwrap(), Some(RopeScaling::Linear { factor: 8.0 }));
        let err = HfConfig::new(json!({"rope_scaling": {"type": "longrope"}})).rope_scaling("full_attention", 1).unwrap_err();
        assert!(err.to_string().contains("longrope"), "{err}");
    }
}
