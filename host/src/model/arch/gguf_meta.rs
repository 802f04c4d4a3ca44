//! Reading a GGUF file's `{arch}.*` metadata: typed access whose errors name the key, the fields
//! every decoder architecture shares, and llama.cpp's tensor names for Hugging Face's.

use super::Arch;
use crate::model::gguf::GgufFile;
use crate::model::{ModelConfig, ModelError, RopeScaling};

pub struct GgufMeta<'a> {
    pub file: &'a GgufFile,
    prefix: &'a str,
}

impl<'a> GgufMeta<'a> {
    pub fn new(file: &'a GgufFile, prefix: &'a str) -> Self {
        GgufMeta { file, prefix }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    pub fn usize(&self, suffix: &str) -> Result<usize, ModelError> {
        self.opt_usize(suffix)
            .ok_or_else(|| ModelError::Config(format!("GGUF: `{}` is missing", self.key(suffix))))
    }

    pub fn opt_usize(&self, suffix: &str) -> Option<usize> {
        self.file.get_u64(&self.key(suffix)).map(|v| v as usize)
    }

    pub fn opt_f32(&self, suffix: &str) -> Option<f32> {
        self.file.get_f32(&self.key(suffix))
    }

    pub fn opt_bool(&self, suffix: &str) -> Option<bool> {
        self.file.get_bool(&self.key(suffix))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    /// The fields every decoder shares.
    pub fn decoder(&self, arch: Arch) -> Result<ModelConfig, ModelError> {
        let hidden_size = self.usize("embedding_length")?;
        let num_attention_heads = self.usize("attention.head_count")?;
        let num_key_value_heads = self.opt_usize("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = self.opt_usize("attention.key_length").unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = match self.opt_usize("vocab_size") {
            Some(v) => v,
            None => self
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|tokens| tokens.len())
                .ok_or_else(|| ModelError::Config(format!("GGUF: `{}` is missing", self.key("vocab_size"))))?,
        };
        let mut c = ModelConfig::dense(
            arch,
            hidden_size,
            self.usize("feed_forward_length")?,
            self.usize("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
        )?;
        c.rms_norm_eps = self.opt_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
        c.rope_theta = self.opt_f32("rope.freq_base").unwrap_or(10_000.0);
        c.max_position_embeddings = self.usize("context_length")?;
        c.rope_scaling = self.rope_scaling(c.max_position_embeddings)?;
        if let Some(dims) = self.opt_usize("rope.dimension_count") {
            c.rotary_dim = dims;
        }
        c.tie_word_embeddings = !self.has_tensor("output.weight");
        c.attention_bias = self.has_tensor("blk.0.attn_q.bias");
        c.sliding_window = self.opt_usize("attention.sliding_window");
        c.bos_token_id = self.file.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32);
        c.eos_token_ids = self.file.get_u64("tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default();
        Ok(c)
    }

    fn rope_scaling(&self, max_position_embeddings: usize) -> Result<Option<RopeScaling>, ModelError> {
        if self.has_tensor("rope_freqs.weight") {
            // Llama 3.1 GGUFs carry the per-frequency divisors as a tensor.
            let factors = self.file.dequantize("rope_freqs.weight")?;
            return Ok(Some(RopeScaling::FreqFactors { factors }));
        }
        let factor = self.opt_f32("rope.scaling.factor");
        match self.file.get_str(&self.key("rope.scaling.type")) {
            Some("linear") => Ok(factor.map(|factor| RopeScaling::Linear { factor })),
            Some("yarn") => {
                let factor = factor.ok_or_else(|| ModelError::Config(format!("GGUF: `{}` is missing", self.key("rope.scaling.factor"))))?;
                Ok(Some(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: self
                        .opt_usize("rope.scaling.original_context_length")
                        .unwrap_or(max_position_embeddings),
                    beta_fast: self.opt_f32("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                    beta_slow: self.opt_f32("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                    attention_factor: self.opt_f32("rope.scaling.attn_factor").unwrap_or(0.1 * factor.ln() + 1.0),
                    truncate: true,
                }))
            }
            Some("none") | None => Ok(None),
            Some(other) => Err(ModelError::Unsupported(format!("GGUF rope scaling `{other}`"))),
        }
    }
}

/// llama.cpp's name for a Hugging Face tensor name (the names most architectures share; see
/// `Arch::gguf_tensor_name` for the exceptions). A mixture of experts' per-expert matrices live
/// in one stacked tensor: `model.layers.3.mlp.experts.5.up_proj.weight` is part 5 of
/// `blk.3.ffn_up_exps.weight`, returned as `(name, Some(5))`.
pub fn gguf_tensor_name(hf_name: &str) -> Option<(String, Option<usize>)> {
    match hf_name {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    if let Some(expert_part) = part.strip_prefix("mlp.experts.") {
        let (expert, module) = expert_part.split_once('.')?;
        let kind = match module {
            "gate_proj.weight" => "ffn_gate_exps",
            "up_proj.weight" => "ffn_up_exps",
            "down_proj.weight" => "ffn_down_exps",
            _ => return None,
        };
        return Some((format!("blk.{layer}.{kind}.weight"), Some(expert.parse().ok()?)));
    }
    let (module, kind) = part.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3's fused gate and up projection is llama.cpp's `ffn_up` (split in its graph).
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        _ => return None,
    };
    Some((format!("blk.{layer}.{gguf_module}.{kind}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_llama_cpp_names() {
        let name = gguf_tensor_name;
        assert_eq!(name("model.embed_tokens.weight").unwrap().0, "token_embd.weight");
        assert_eq!(name("model.layers.12.self_attn.k_proj.bias").unwrap().0, "blk.12.attn_k.bias");
        assert_eq!(name("model.layers.0.mlp.down_proj.weight").unwrap().0, "blk.0.ffn_down.weight");
        assert_eq!(name("model.layers.0.post_attention_layernorm.weight").unwrap().0, "blk.0.ffn_norm.weight");
        assert_eq!(name("model.layers.1.self_attn.q_norm.weight").unwrap().0, "blk.1.attn_q_norm.weight");
        assert_eq!(name("model.layers.2.mlp.gate.weight").unwrap().0, "blk.2.ffn_gate_inp.weight");
        assert_eq!(name("model.layers.2.mlp.experts.7.up_proj.weight").unwrap(), ("blk.2.ffn_up_exps.weight".into(), Some(7)));
        assert!(name("model.layers.0.unknown.weight").is_none());
    }
}
