//! The weights of a Llama-family model in float32, laid out as the CPU forward wants them, and the
//! one place that assembles them from any source (`WeightSource`).
//!
//! Layout: matrices are row-major `[out_features, in_features]` (Hugging Face's layout). The Q, K
//! and V projections are stacked into one `[q + 2 kv, hidden]` matrix and the gate and up
//! projections into one `[2 * intermediate, hidden]` matrix, so each needs a single GEMM. Q and K
//! rows are in Hugging Face's order (rotate-half RoPE); sources that store them otherwise (GGUF
//! `llama`) un-permute them before they get here.

use super::{ModelConfig, ModelError};

/// A dense float32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ModelError::Shape(format!(
                "tensor of shape {shape:?} needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Where weights come from. Names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`);
/// a source maps them to its own naming and returns the tensor in Hugging Face's layout.
pub trait WeightSource {
    /// The tensor with this Hugging Face name, with its shape, or `Ok(None)` if the source lacks it.
    fn load(&self, hf_name: &str, expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError>;
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// `[q_size + 2 * kv_size, hidden]`: Q rows, then K rows, then V rows.
    pub qkv_proj: Vec<f32>,
    /// `[q_size + 2 * kv_size]` (Qwen2), same order as `qkv_proj`.
    pub qkv_bias: Option<Vec<f32>>,
    /// `[hidden, q_size]`.
    pub o_proj: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub gate_up_proj: Vec<f32>,
    /// `[hidden, intermediate]`.
    pub down_proj: Vec<f32>,
}

pub struct LlamaWeights {
    /// `[vocab, hidden]`.
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Vec<f32>>,
}

impl LlamaWeights {
    /// The output projection (the embedding matrix when tied).
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed_tokens)
    }

    /// A copy with every matrix passed through `f` (norm weights and biases unchanged): e.g. the
    /// weights rounded to bfloat16, to judge the GPU's arithmetic apart from its weight precision.
    pub fn map_matrices(&self, f: impl Fn(f32) -> f32 + Sync) -> LlamaWeights {
        let map = |m: &Vec<f32>| m.iter().map(|&v| f(v)).collect::<Vec<f32>>();
        LlamaWeights {
            embed_tokens: map(&self.embed_tokens),
            layers: self
                .layers
                .iter()
                .map(|l| LayerWeights {
                    attn_norm: l.attn_norm.clone(),
                    qkv_proj: map(&l.qkv_proj),
                    qkv_bias: l.qkv_bias.clone(),
                    o_proj: map(&l.o_proj),
                    ffn_norm: l.ffn_norm.clone(),
                    gate_up_proj: map(&l.gate_up_proj),
                    down_proj: map(&l.down_proj),
                })
                .collect(),
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(map),
        }
    }

    /// Assembles every weight of `config` from `source`, checking each shape.
    pub fn load(config: &ModelConfig, source: &dyn WeightSource) -> Result<Self, ModelError> {
        let h = config.hidden_size;
        let (q, kv, inter) = (config.q_size(), config.kv_size(), config.intermediate_size);
        let require = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
            match source.load(name, shape)? {
                Some(t) if t.shape == shape => Ok(t.data),
                Some(t) => Err(ModelError::Shape(format!(
                    "`{name}` has shape {:?}, the config needs {shape:?}",
                    t.shape
                ))),
                None => Err(ModelError::MissingTensor(name.to_string())),
            }
        };

        let embed_tokens = require("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_proj = [
                require(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?,
                require(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?,
                require(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?,
            ]
            .concat();
            let qkv_bias = if config.attention_bias {
                Some(
                    [
                        require(&format!("{p}.self_attn.q_proj.bias"), &[q])?,
                        require(&format!("{p}.self_attn.k_proj.bias"), &[kv])?,
                        require(&format!("{p}.self_attn.v_proj.bias"), &[kv])?,
                    ]
                    .concat(),
                )
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: require(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv_proj,
                qkv_bias,
                o_proj: require(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?,
                ffn_norm: require(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up_proj: [
                    require(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?,
                    require(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?,
                ]
                .concat(),
                down_proj: require(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
            });
        }
        let final_norm = require("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(require("lm_head.weight", &[config.vocab_size, h])?)
        };
        Ok(LlamaWeights { embed_tokens, layers, final_norm, lm_head })
    }
}
