//! The operations an architecture's forward is written over. A backend implements them once (the
//! CPU in float32 as the reference; CUDA in bfloat16) and every architecture runs on it.
//!
//! A forward runs over one `ForwardBatch`: every activation is `[num_tokens, width]` rows, one
//! per token of the batch, held by the backend and named by an `Act` handle. Operations only
//! enqueue work and never read results back to the host, so a device backend can capture a whole
//! forward in a graph. The attention projection's output rows are `[q heads | k heads | v heads]`
//! (`ModelConfig::q_size` then two `kv_size`), the layout `rope_and_cache` and `attention` expect.
//!
//! Under tensor parallelism (`model::parallel`) each rank runs the same forward over its shard
//! with its local sizes; `all_reduce` and `all_gather_logits` are where the ranks meet. A backend
//! that runs one rank only makes them nothing.

use super::config::{Activation, LayerAttention, MoeConfig};
use super::weights::{MoeWeights, Weights};
use super::ModelError;

/// An activation held by the backend: one row per token of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Act(pub usize);

/// An RMSNorm's parameters: `x / sqrt(mean(x²) + eps) * w`, or `* (1 + w)` with `unit_offset`
/// (Gemma).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    pub eps: f32,
    pub unit_offset: bool,
}

pub type Matrix<O> = <<O as Ops>::Family as Weights>::Matrix;
pub type Vector<O> = <<O as Ops>::Family as Weights>::Vector;

pub trait Ops {
    /// The weight types this backend runs from.
    type Family: Weights;

    /// The architecture is done with `act`: its memory may be reused by later activations.
    fn free(&mut self, act: Act);

    /// The rows of `table` for the batch's tokens, times `multiplier` when given. `table` holds
    /// the token ids `first_token..first_token + rows` (a rank's vocabulary range; 0.. for the
    /// whole); the rows of other tokens are zeros.
    fn embed(&mut self, table: &Matrix<Self>, first_token: usize, multiplier: Option<f32>) -> Result<Act, ModelError>;

    /// In place: `act` summed over the tensor-parallel ranks, the same on every rank (added in
    /// rank order). Nothing at world 1.
    fn all_reduce(&mut self, act: Act) -> Result<(), ModelError>;

    /// The logits `logits` left, each rank's vocabulary range of each row, become the whole
    /// vocabulary: every rank's range in rank order. Nothing at world 1.
    fn all_gather_logits(&mut self) -> Result<(), ModelError>;

    /// `residual += delta` (when given), then returns `norm(residual) * weight`.
    fn add_norm(&mut self, residual: Act, delta: Option<Act>, weight: &Vector<Self>, norm: Norm) -> Result<Act, ModelError>;

    /// `norm(x) * weight` into a new activation.
    fn norm(&mut self, x: Act, weight: &Vector<Self>, norm: Norm) -> Result<Act, ModelError>;

    /// `x · wᵀ (+ bias)`: a `[rows, in]` activation times an `[out, in]` matrix.
    fn linear(&mut self, x: Act, w: &Matrix<Self>) -> Result<Act, ModelError>;

    /// In place: RMSNorm over each of `num_heads` heads of `head_dim` values starting at head
    /// `first_head` of every row, with one `[head_dim]` weight (Qwen3's and Gemma's q/k norms).
    fn head_norm(&mut self, qkv: Act, first_head: usize, num_heads: usize, weight: &Vector<Self>, norm: Norm) -> Result<(), ModelError>;

    /// In place: rotates the query and key heads of `qkv` by each token's position (with the
    /// layer's RoPE table), then writes the keys and values into layer `layer`'s cache slots.
    fn rope_and_cache(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<(), ModelError>;

    /// Causal attention of each token's query heads over its sequence's cached keys and values
    /// (within the window, scaled, soft-capped as `attention` says): `[rows, q_size]`.
    fn attention(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<Act, ModelError>;

    /// `act(gate) * up` of `[gate | up]` rows: half as wide.
    fn gated_activation(&mut self, gate_up: Act, activation: Activation) -> Result<Act, ModelError>;

    /// A sparse mixture-of-experts MLP: the router's softmax picks each token's `top_k`
    /// experts, whose gated MLPs are summed with those weights.
    fn moe(&mut self, x: Act, weights: &MoeWeights<Self::Family>, config: &MoeConfig, activation: Activation) -> Result<Act, ModelError>;

    /// The end of the forward: `residual += delta`, then for the rows the batch asks logits of,
    /// `norm(residual) · lm_headᵀ`, soft-capped when given. The backend keeps them.
    fn logits(
        &mut self,
        residual: Act,
        delta: Option<Act>,
        final_norm: &Vector<Self>,
        norm: Norm,
        lm_head: &Matrix<Self>,
        softcap: Option<f32>,
    ) -> Result<(), ModelError>;
}
