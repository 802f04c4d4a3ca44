//! GGUF models: the model configuration from `{arch}.*` metadata, and weights under llama.cpp's
//! tensor names, dequantized to float32.
//!
//! llama.cpp's converter permutes the rows of the Q and K projections of `llama`-architecture
//! models so that RoPE rotates adjacent pairs (interleaved form). We keep Hugging Face's
//! rotate-half form everywhere, so those rows are un-permuted here, on load.

use std::path::Path;

use crate::model::gguf::GgufFile;
use crate::model::{ModelConfig, ModelError, RopeScaling, Tensor, WeightSource};

pub struct GgufSource {
    file: GgufFile,
    architecture: String,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let architecture = file
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::Config("GGUF: `general.architecture` is missing".into()))?
            .to_string();
        let mut source = GgufSource { file, architecture, num_heads: 0, num_kv_heads: 0 };
        let config = source.config()?;
        source.num_heads = config.num_attention_heads;
        source.num_kv_heads = config.num_key_value_heads;
        Ok(source)
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The model configuration from the `{arch}.*` metadata keys.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let arch = self.architecture.as_str();
        if !matches!(arch, "llama" | "mistral" | "qwen2") {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture `{arch}` (supported: llama, mistral, qwen2)"
            )));
        }
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let req = |suffix: &str| -> Result<usize, ModelError> {
            self.file
                .get_u64(&key(suffix))
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF: `{}` is missing", key(suffix))))
        };
        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        let num_key_value_heads = self
            .file
            .get_u64(&key("attention.head_count_kv"))
            .map_or(num_attention_heads, |v| v as usize);
        let head_dim = self
            .file
            .get_u64(&key("attention.key_length"))
            .map_or(hidden_size / num_attention_heads.max(1), |v| v as usize);
        let vocab_size = match self.file.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => self
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|tokens| tokens.len())
                .ok_or_else(|| ModelError::Config(format!("GGUF: `{}` is missing", key("vocab_size"))))?,
        };
        let rope_scaling = if let Some(info) = self.file.tensor("rope_freqs.weight") {
            // Llama 3.1 GGUFs carry the per-frequency divisors as a tensor.
            let factors = self.file.dequantize(&info.name.clone())?;
            Some(RopeScaling::FreqFactors { factors })
        } else {
            match self.file.get_str(&key("rope.scaling.type")) {
                Some("linear") => self
                    .file
                    .get_f32(&key("rope.scaling.factor"))
                    .map(|factor| RopeScaling::Linear { factor }),
                Some("none") | None => None,
                Some(other) => return Err(ModelError::Unsupported(format!("GGUF rope scaling `{other}`"))),
            }
        };
        let config = ModelConfig {
            architecture: arch.to_string(),
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self.file.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: self.file.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: req("context_length")?,
            tie_word_embeddings: self.file.tensor("output.weight").is_none(),
            attention_bias: self.file.tensor("blk.0.attn_q.bias").is_some(),
            bos_token_id: self.file.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_ids: self
                .file
                .get_u64("tokenizer.ggml.eos_token_id")
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// llama.cpp's name for a Hugging Face tensor name.
pub(crate) fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    match hf_name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{kind}"))
}

/// Undoes llama.cpp's `permute` of Q/K rows: within each head, GGUF row `2i + j` holds Hugging
/// Face row `j * head_dim / 2 + i` (`j` in {0, 1}). Works on weights (`row_len` = in-features)
/// and on biases (`row_len` = 1).
pub(crate) fn unpermute_qk_rows(data: &[f32], num_heads: usize, row_len: usize) -> Vec<f32> {
    let rows = data.len() / row_len;
    let head_dim = rows / num_heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
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

impl WeightSource for GgufSource {
    fn load(&self, hf_name: &str, _expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let Some(name) = gguf_tensor_name(hf_name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor(&name) else {
            return Ok(None);
        };
        // GGUF lists dimensions innermost first; Hugging Face outermost first.
        let shape: Vec<usize> = info.shape.iter().rev().copied().collect();
        let mut data = self.file.dequantize(&name)?;
        if self.architecture == "llama" {
            let row_len = if shape.len() == 2 { shape[1] } else { 1 };
            if hf_name.contains("self_attn.q_proj") {
                data = unpermute_qk_rows(&data, self.num_heads, row_len);
            } else if hf_name.contains("self_attn.k_proj") {
                data = unpermute_qk_rows(&data, self.num_kv_heads, row_len);
            }
        }
        Tensor::new(shape, data).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_llama_cpp_names() {
        assert_eq!(gguf_tensor_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_tensor_name("model.layers.12.self_attn.k_proj.bias").unwrap(), "blk.12.attn_k.bias");
        assert_eq!(gguf_tensor_name("model.layers.0.mlp.down_proj.weight").unwrap(), "blk.0.ffn_down.weight");
        assert_eq!(gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert!(gguf_tensor_name("model.layers.0.unknown.weight").is_none());
    }

    /// The permutation llama.cpp's converter applies (`convert_hf_to_gguf.py`, `LlamaModel.permute`):
    /// `w.reshape(n_head, 2, dim / n_head / 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    fn llama_cpp_permute(data: &[f32], num_heads: usize, row_len: usize) -> Vec<f32> {
        let rows = data.len() / row_len;
        let half = rows / num_heads / 2;
        let mut out = vec![0.0; data.len()];
        // Source index (head, j, i) in HF order goes to (head, i, j).
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
