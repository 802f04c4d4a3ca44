//! The model specification every backend runs from: sizes, and the architecture's choices (norm
//! form, biases, q/k norm, sliding windows, soft-capping, activation, mixture of experts, RoPE).
//! The architecture files in `model::arch` fill it from a Hugging Face `config.json` or from GGUF
//! metadata; nothing downstream reads either format.
//!
//! Invariants kept by `validate`: every size is non-zero, the query heads are a multiple of the
//! key/value heads (grouped-query attention), the rotary dimension is even and within the head,
//! `layer_types` has one entry per layer, and a mixture of experts routes to at least one of its
//! experts.

use serde::{Deserialize, Serialize};

use super::arch::Arch;
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
    /// YaRN (`rope_type: "yarn"`, Qwen2.5/Qwen3 long context): low frequencies interpolated, high
    /// ones kept, a ramp between, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// Whether the ramp's ends are rounded to whole dimensions (transformers' `truncate`).
        truncate: bool,
    },
    /// Explicit per-frequency divisors (llama.cpp's `rope_freqs.weight` tensor in Llama 3.1 GGUFs).
    FreqFactors { factors: Vec<f32> },
}

/// The gated activation of the MLP: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen, Mistral, Phi-3.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

/// Which attention a layer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Every earlier position.
    Full,
    /// The last `sliding_window` positions (the token itself included).
    Sliding,
}

/// A sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): each token goes to its `top_k` experts,
/// weighted by the router's softmax.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub expert_intermediate_size: usize,
    /// Whether the chosen experts' weights are renormalised to sum to 1.
    pub norm_topk_prob: bool,
    /// Layers that keep a dense MLP of `intermediate_size` (Qwen3-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub dense_layers: Vec<usize>,
}

/// What one layer's attention needs besides the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// Positions a query sees, itself included; `None` for all.
    pub window: Option<usize>,
    /// Multiplies q·k before the softmax.
    pub scale: f32,
    /// `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// Which RoPE table rotates this layer: 0 global, 1 local (`rope_local_theta`).
    pub rope: usize,
}

impl LayerAttention {
    /// Plain causal attention over every earlier position, scaled by `1 / sqrt(head_dim)`.
    pub fn full(head_dim: usize) -> Self {
        LayerAttention { window: None, scale: 1.0 / (head_dim as f32).sqrt(), softcap: None, rope: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Arch,
    pub hidden_size: usize,
    /// The dense MLP's intermediate size (of the dense layers, in a mixture of experts).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    /// Norms multiply by `1 + weight` instead of `weight` (Gemma).
    pub norm_unit_offset: bool,
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Leading dimensions of each head that RoPE rotates (Phi's `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// RoPE base of the sliding-window layers, unscaled (Gemma 3); `None`: they use the global one.
    pub rope_local_theta: Option<f32>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the Q, K and V projections (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms after attention and around the MLP besides the pre-norms (Gemma 2/3).
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    pub embedding_multiplier: Option<f32>,
    pub hidden_act: Activation,
    /// Attention scores are multiplied by `query_scale` (default `1 / sqrt(head_dim)`; Gemma:
    /// `query_pre_attn_scalar ** -0.5`).
    pub query_scale: f32,
    pub sliding_window: Option<usize>,
    /// One entry per layer; `Sliding` only with a `sliding_window`.
    pub layer_types: Vec<LayerType>,
    pub attn_logit_softcapping: Option<f32>,
    pub final_logit_softcapping: Option<f32>,
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
}

/// The largest value each size may have: far above any released model, low enough that what is
/// sized from them (per-layer tables, parameter counts, the KV cache plan) cannot overflow or
/// exhaust memory before the weights are even looked at.
pub const SIZE_LIMITS: [(&str, usize); 11] = [
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1 << 12),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 13),
    ("vocab_size", 1 << 23),
    ("max_position_embeddings", 1 << 24),
    ("sliding_window", 1 << 24),
    ("num_experts", 1 << 12),
    ("moe_intermediate_size", 1 << 20),
];

fn check_size(name: &str, value: usize) -> Result<(), ModelError> {
    let limit = SIZE_LIMITS.iter().find(|(n, _)| *n == name).map_or(usize::MAX, |(_, l)| *l);
    if value > limit {
        return Err(ModelError::Config(format!("`{name}` is {value}, more than this server supports ({limit})")));
    }
    Ok(())
}

impl ModelConfig {
    /// A Llama-shaped configuration with every optional feature off: the starting point the
    /// architecture files refine.
    /// Every size is checked against `SIZE_LIMITS` first: a configuration comes from a file, and
    /// per-layer tables are allocated from it before `validate` runs.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        architecture: Arch,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
        vocab_size: usize,
    ) -> Result<Self, ModelError> {
        for (name, value) in [
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("head_dim", head_dim),
            ("vocab_size", vocab_size),
        ] {
            check_size(name, value)?;
        }
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: 1e-6,
            norm_unit_offset: false,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rotary_dim: head_dim,
            rope_local_theta: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: false,
            qk_norm: false,
            sandwich_norms: false,
            embedding_multiplier: None,
            hidden_act: Activation::Silu,
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            layer_types: vec![LayerType::Full; num_hidden_layers],
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            moe: None,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        })
    }

    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Width of a token's fused QKV projection output: its query, key and value heads.
    pub fn qkv_size(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }

    /// Query heads per key/value head.
    pub fn gqa_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Whether layer `layer` has a dense MLP (always, without experts).
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_none_or(|moe| moe.dense_layers.contains(&layer))
    }

    /// What layer `layer`'s attention needs.
    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        let sliding = self.layer_types.get(layer) == Some(&LayerType::Sliding);
        LayerAttention {
            window: if sliding { self.sliding_window } else { None },
            scale: self.query_scale,
            softcap: self.attn_logit_softcapping,
            rope: usize::from(sliding && self.rope_local_theta.is_some()),
        }
    }

    /// Whether every layer sees only a window, so blocks wholly before it can be given back.
    pub fn all_layers_sliding(&self) -> Option<usize> {
        self.layer_types.iter().all(|t| *t == LayerType::Sliding).then_some(self.sliding_window).flatten()
    }

    /// The longest run of positions any layer's query attends to, at `context` positions: the
    /// context, or the window when every layer has one (what split-K partitions must cover).
    pub fn attention_span(&self, context: usize) -> usize {
        self.all_layers_sliding().map_or(context, |window| context.min(window))
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let norms = 2 + if self.sandwich_norms { 2 } else { 0 };
        let attention = h * self.qkv_size()
            + self.q_size() * h
            + if self.attention_bias { self.qkv_size() } else { 0 }
            + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let mlps: usize = (0..self.num_hidden_layers)
            .map(|layer| match &self.moe {
                Some(moe) if !self.is_dense_layer(layer) => {
                    moe.num_experts * 3 * h * moe.expert_intermediate_size + moe.num_experts * h
                }
                _ => 3 * h * self.intermediate_size,
            })
            .sum();
        let embeddings = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        embeddings + (attention + norms * h) * self.num_hidden_layers + mlps + h
    }

    /// Weights of one token's forward that are read (the active experts only): what a decode
    /// step streams from memory.
    pub fn num_active_parameters(&self) -> usize {
        match &self.moe {
            None => self.num_parameters(),
            Some(moe) => {
                let sparse_layers = (0..self.num_hidden_layers).filter(|&l| !self.is_dense_layer(l)).count();
                let idle = (moe.num_experts - moe.top_k) * 3 * self.hidden_size * moe.expert_intermediate_size;
                self.num_parameters() - idle * sparse_layers
            }
        }
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
            check_size(name, value)?;
        }
        if let Some(window) = self.sliding_window {
            check_size("sliding_window", window)?;
        }
        if let Some(moe) = &self.moe {
            check_size("num_experts", moe.num_experts)?;
            check_size("moe_intermediate_size", moe.expert_intermediate_size)?;
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::Config(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim == 0 || self.rotary_dim > self.head_dim {
            return Err(ModelError::Config(format!(
                "the rotary dimension must be even and within `head_dim` ({}), got {}",
                self.head_dim, self.rotary_dim
            )));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) || !positive(self.query_scale) {
            return Err(ModelError::Config("`rms_norm_eps`, `rope_theta` and the attention scale must be positive".into()));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "`layer_types` has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            )));
        }
        if self.layer_types.contains(&LayerType::Sliding) && self.sliding_window.is_none_or(|w| w == 0) {
            return Err(ModelError::Config("sliding-window layers need a positive `sliding_window`".into()));
        }
        for (name, cap) in [("attn_logit_softcapping", self.attn_logit_softcapping), ("final_logit_softcapping", self.final_logit_softcapping)] {
            if cap.is_some_and(|c| !positive(c)) {
                return Err(ModelError::Config(format!("`{name}` must be positive")));
            }
        }
        if let Some(moe) = &self.moe {
            if moe.num_experts == 0 || moe.top_k == 0 || moe.top_k > moe.num_experts || moe.expert_intermediate_size == 0 {
                return Err(ModelError::Config(format!(
                    "a mixture of experts needs 1 <= `num_experts_per_tok` ({}) <= `num_experts` ({}) and a positive \
                     `moe_intermediate_size`",
                    moe.top_k, moe.num_experts
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_the_limits_are_refused_before_anything_is_allocated() {
        // Found by the `gguf` fuzz target: `llama.block_count` = 4,278,156,289 made `dense`
        // allocate a 4 GB table of layer types.
        let err = ModelConfig::dense(Arch::Llama, 8, 16, 0xFEFF_7C01, 2, 1, 4, 10).unwrap_err().to_string();
        assert!(err.contains("`num_hidden_layers` is 4278156289"), "{err}");
        assert!(ModelConfig::dense(Arch::Llama, 1 << 20, 16, 2, 2, 1, 4, 10).is_err());
        assert!(ModelConfig::dense(Arch::Llama, 8, 16, 2, 2, 1, 4, usize::MAX).is_err());
        let mut c = ModelConfig::dense(Arch::Llama, 8, 16, 2, 2, 1, 4, 10).unwrap();
        c.max_position_embeddings = usize::MAX;
        assert!(c.validate().unwrap_err().to_string().contains("max_position_embeddings"));
        // The largest released shapes pass.
        ModelConfig::dense(Arch::Llama, 16_384, 53_248, 126, 128, 8, 128, 128_256).unwrap().validate().unwrap();
    }

    #[test]
    fn layer_attention_follows_layer_types() {
        let mut c = ModelConfig::dense(Arch::Gemma3, 8, 16, 3, 2, 1, 4, 10).unwrap();
        c.sliding_window = Some(5);
        c.rope_local_theta = Some(10_000.0);
        c.layer_types = vec![LayerType::Sliding, LayerType::Sliding, LayerType::Full];
        c.validate().unwrap();
        assert_eq!(c.layer_attention(0).window, Some(5));
        assert_eq!(c.layer_attention(0).rope, 1);
        assert_eq!(c.layer_attention(2).window, None);
        assert_eq!(c.layer_attention(2).rope, 0);
        assert_eq!(c.all_layers_sliding(), None);
        c.layer_types = vec![LayerType::Sliding; 3];
        assert_eq!(c.all_layers_sliding(), Some(5));
        c.sliding_window = None;
        assert!(c.validate().unwrap_err().to_string().contains("sliding_window"));
    }

    #[test]
    fn moe_parameters_count_every_expert_and_active_ones_only_top_k() {
        let mut c = ModelConfig::dense(Arch::Qwen3Moe, 8, 16, 2, 2, 1, 4, 10).unwrap();
        c.moe = Some(MoeConfig { num_experts: 4, top_k: 2, expert_intermediate_size: 6, norm_topk_prob: true, dense_layers: vec![1] });
        let dense = ModelConfig::dense(Arch::Llama, 8, 16, 2, 2, 1, 4, 10).unwrap();
        // Layer 0: 4 experts of 3*8*6 plus a 4x8 router instead of a 3*8*16 MLP.
        assert_eq!(c.num_parameters(), dense.num_parameters() - 3 * 8 * 16 + 4 * 3 * 8 * 6 + 4 * 8);
        assert_eq!(c.num_active_parameters(), c.num_parameters() - 2 * 3 * 8 * 6);
        c.moe.as_mut().unwrap().top_k = 5;
        assert!(c.validate().unwrap_err().to_string().contains("num_experts_per_tok"));
    }
}
