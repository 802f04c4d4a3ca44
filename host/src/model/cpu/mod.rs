//! The CPU reference forward of the Llama family, in float32: RMSNorm, RoPE, grouped-query
//! attention over the paged KV cache, SwiGLU, tied or untied embeddings.
//!
//! It takes a `ForwardBatch` that mixes prefill chunks and decode tokens of many sequences, writes
//! each new token's key and value into its cache slot, and returns the logits of the rows the
//! batch asks for. This is the path every other backend is checked against.

mod attention;
mod kv_storage;
pub mod matmul;
pub mod ops;

use std::sync::Arc;

use rayon::prelude::*;

pub use self::attention::paged_attention;
pub use self::kv_storage::CpuKvCache;
use self::matmul::matmul_wt;
use self::ops::{rms_norm, silu_mul};
use super::rope::Rope;
use super::{LlamaWeights, ModelConfig, ModelError};
use crate::kv_cache::KvCacheLayout;
use crate::runner::ForwardBatch;

/// Cheap to clone: clones share the weights.
#[derive(Clone)]
pub struct CpuModel {
    config: ModelConfig,
    weights: Arc<LlamaWeights>,
    rope: Rope,
}

impl CpuModel {
    pub fn new(config: ModelConfig, weights: LlamaWeights) -> Self {
        let rope = Rope::new(&config);
        CpuModel { config, weights: Arc::new(weights), rope }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// A cache layout for this model with `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvCacheLayout {
        KvCacheLayout {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs `batch` and returns logits `[batch.logits_rows.len(), vocab_size]`.
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut CpuKvCache) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let layout = *cache.layout();
        if layout.num_layers != c.num_hidden_layers
            || layout.num_kv_heads != c.num_key_value_heads
            || layout.head_dim != c.head_dim
            || layout.block_size != batch.block_size
            || layout.num_blocks != batch.num_blocks
        {
            return Err(ModelError::Input(format!("KV cache layout {layout:?} does not fit this model and batch")));
        }
        if let Some(&bad) = batch.token_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
        }
        let n = batch.num_tokens();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_size, kv_size, inter) = (c.q_size(), c.kv_size(), c.intermediate_size);
        let qkv_size = q_size + 2 * kv_size;
        let half = hd / 2;

        let mut x = vec![0.0f32; n * h];
        for (row, &token) in x.chunks_exact_mut(h).zip(&batch.token_ids) {
            row.copy_from_slice(&self.weights.embed_tokens[token as usize * h..][..h]);
        }
        let mut cos = vec![0.0f32; n * half];
        let mut sin = vec![0.0f32; n * half];
        for ((c_row, s_row), &pos) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).zip(&batch.positions) {
            self.rope.cos_sin(pos, c_row, s_row);
        }

        let mut normed = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * qkv_size];
        let mut q = vec![0.0f32; n * q_size];
        let mut attn = vec![0.0f32; n * q_size];
        let mut proj = vec![0.0f32; n * h];
        let mut gate_up = vec![0.0f32; n * 2 * inter];
        let mut act = vec![0.0f32; n * inter];
        let scale = 1.0 / (hd as f32).sqrt();

        for (layer_index, layer) in self.weights.layers.iter().enumerate() {
            rms_norm_rows(&mut normed, &x, &layer.attn_norm, c.rms_norm_eps);
            matmul_wt(&mut qkv, &normed, &layer.qkv_proj, n, h, qkv_size);
            qkv.par_chunks_mut(qkv_size).enumerate().for_each(|(t, row)| {
                if let Some(bias) = &layer.qkv_bias {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
                let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                Rope::apply(&mut row[..q_size + kv_size], hd, cos, sin);
            });
            for (t, row) in qkv.chunks_exact(qkv_size).enumerate() {
                q[t * q_size..][..q_size].copy_from_slice(&row[..q_size]);
                let (keys, values) = row[q_size..].split_at(kv_size);
                cache.write(layer_index, batch.slot_mapping[t] as usize, keys, values);
            }
            let (keys, values) = cache.layer(layer_index);
            paged_attention(&mut attn, &q, batch, keys, values, &layout, c.num_attention_heads, scale);
            matmul_wt(&mut proj, &attn, &layer.o_proj, n, q_size, h);
            add_in_place(&mut x, &proj);

            rms_norm_rows(&mut normed, &x, &layer.ffn_norm, c.rms_norm_eps);
            matmul_wt(&mut gate_up, &normed, &layer.gate_up_proj, n, h, 2 * inter);
            act.par_chunks_mut(inter)
                .zip(gate_up.par_chunks(2 * inter))
                .for_each(|(out, gu)| silu_mul(out, gu));
            matmul_wt(&mut proj, &act, &layer.down_proj, n, inter, h);
            add_in_place(&mut x, &proj);
        }

        let rows = batch.logits_rows.len();
        let mut final_hidden = vec![0.0f32; rows * h];
        for (out, &row) in final_hidden.chunks_exact_mut(h).zip(&batch.logits_rows) {
            rms_norm(out, &x[row * h..][..h], &self.weights.final_norm, c.rms_norm_eps);
        }
        let mut logits = vec![0.0f32; rows * c.vocab_size];
        matmul_wt(&mut logits, &final_hidden, self.weights.lm_head(), rows, h, c.vocab_size);
        Ok(logits)
    }
}

fn rms_norm_rows(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let h = weight.len();
    out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, row)| rms_norm(o, row, weight, eps));
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
