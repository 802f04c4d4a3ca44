//! The pre-norm decoder every supported architecture is an instance of, written once over `Ops`:
//! embedding (optionally scaled), then per layer a normed attention block (fused QKV with
//! optional biases, optional per-head q/k norms, RoPE, paged attention with the layer's window)
//! and a normed MLP (dense gated, or a mixture of experts), each optionally followed by its own
//! norm before it joins the residual (Gemma's sandwich norms), and finally the norm and the LM
//! head. What differs between architectures is configuration (`ModelConfig`) and tensor names
//! (`Naming`), which each architecture's file supplies.
//!
//! Tensor parallelism is stated here once for every architecture: `load` says how each weight
//! splits across ranks (`model::parallel` computes the slices), and `forward` sums the ranks'
//! partial outputs where a split leaves them (after the vocabulary-split embedding, the
//! o-projection and the MLP's down projection) and gathers the vocabulary-split logits. At world
//! 1 those collectives do nothing.

use crate::model::ops::{Act, Norm, Ops, Vector};
use crate::model::parallel::ShardPlan;
use crate::model::weights::{LayerWeights, Loader, Mlp, ModelWeights, MoeWeights, StackedPart, WeightStore};
use crate::model::{ModelConfig, ModelError};

/// Hugging Face tensor names that differ between architectures (suffixes after
/// `model.layers.{i}.`).
pub struct Naming {
    /// One `self_attn.qkv_proj` instead of `q_proj`, `k_proj`, `v_proj` (Phi-3).
    pub fused_qkv: bool,
    /// One `mlp.gate_up_proj` instead of `gate_proj` and `up_proj` (Phi-3).
    pub fused_gate_up: bool,
    /// The norm before the MLP.
    pub ffn_norm: &'static str,
    /// The norm on the attention output (with `ModelConfig::sandwich_norms`).
    pub post_attn_norm: &'static str,
    /// The norm on the MLP output (with `ModelConfig::sandwich_norms`).
    pub post_ffn_norm: &'static str,
}

/// Llama's names, which most architectures keep.
pub const LLAMA_NAMING: Naming = Naming {
    fused_qkv: false,
    fused_gate_up: false,
    ffn_norm: "post_attention_layernorm",
    post_attn_norm: "",
    post_ffn_norm: "",
};

/// Every weight `config` needs, by Hugging Face name: the whole of each, or the loader's rank's
/// shard of it. `config` is the whole model's (the checkpoint's shapes); a shard's forward runs
/// with its plan's `local_config`.
///
/// Splits: Q, K, V (and their biases), gate and up are split by output rows (column-parallel),
/// a fused tensor section by section; `o_proj` and `down` by input columns (row-parallel, their
/// outputs all-reduced); every expert as a dense MLP by the experts' intermediate size, the router
/// replicated; the embedding and the untied head by vocabulary rows; norms replicated.
pub fn load<S: WeightStore>(config: &ModelConfig, names: &Naming, loader: &mut Loader<'_, S>) -> Result<ModelWeights<S::Family>, ModelError> {
    let c = config;
    let shard = ShardPlan::new(c, loader.tensor_parallel())?;
    let h = c.hidden_size;
    let (q, kv, hd) = (c.q_size(), c.kv_size(), c.head_dim);
    let vocab_rows = |name: &str| [StackedPart::rows(name, c.vocab_size, vec![shard.vocab.clone()])];
    let embed_tokens = loader.stacked(&vocab_rows("model.embed_tokens.weight"), h, false)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = |suffix: &str| format!("model.layers.{i}.{suffix}");
        let qkv = if names.fused_qkv {
            loader.stacked(&[StackedPart::rows(p("self_attn.qkv_proj.weight"), q + 2 * kv, shard.qkv_rows())], h, c.attention_bias)?
        } else {
            let parts = [
                StackedPart::rows(p("self_attn.q_proj.weight"), q, vec![shard.q_rows()]),
                StackedPart::rows(p("self_attn.k_proj.weight"), kv, vec![shard.kv_rows()]),
                StackedPart::rows(p("self_attn.v_proj.weight"), kv, vec![shard.kv_rows()]),
            ];
            loader.stacked(&parts, h, c.attention_bias)?
        };
        let mlp = if c.is_dense_layer(i) {
            let inter = c.intermediate_size;
            let slice = shard.intermediate.clone().expect("a model with a dense layer splits its intermediate size");
            let gate_up = if names.fused_gate_up {
                loader.stacked(&[StackedPart::rows(p("mlp.gate_up_proj.weight"), 2 * inter, shard.gate_up_rows())], h, false)?
            } else {
                let parts = [StackedPart::rows(p("mlp.gate_proj.weight"), inter, vec![slice.clone()]), StackedPart::rows(p("mlp.up_proj.weight"), inter, vec![slice.clone()])];
                loader.stacked(&parts, h, false)?
            };
            Mlp::Dense { gate_up, down: loader.split_columns(&[(p("mlp.down_proj.weight"), h)], inter, slice, false)? }
        } else {
            let moe = c.moe.as_ref().expect("a sparse layer has a mixture of experts");
            let inter = moe.expert_intermediate_size;
            let slice = shard.expert_intermediate.clone().expect("a mixture of experts splits its experts' intermediate size");
            let experts = 0..moe.num_experts;
            let gate_up: Vec<StackedPart> = experts
                .clone()
                .flat_map(|e| {
                    let part = |kind: &str| StackedPart::rows(p(&format!("mlp.experts.{e}.{kind}_proj.weight")), inter, vec![slice.clone()]);
                    [part("gate"), part("up")]
                })
                .collect();
            let down: Vec<(String, usize)> = experts.map(|e| (p(&format!("mlp.experts.{e}.down_proj.weight")), h)).collect();
            Mlp::Moe(MoeWeights {
                router: loader.matrix(&p("mlp.gate.weight"), moe.num_experts, h)?,
                gate_up: loader.stacked(&gate_up, h, false)?,
                down: loader.split_columns(&down, inter, slice, false)?,
            })
        };
        layers.push(LayerWeights {
            attn_norm: loader.vector(&p("input_layernorm.weight"), h)?,
            qkv,
            q_norm: loader.optional_vector(&p("self_attn.q_norm.weight"), hd, c.qk_norm)?,
            k_norm: loader.optional_vector(&p("self_attn.k_norm.weight"), hd, c.qk_norm)?,
            o_proj: loader.split_columns(&[(p("self_attn.o_proj.weight"), h)], q, shard.q_rows(), false)?,
            post_attn_norm: loader.optional_vector(&p(&format!("{}.weight", names.post_attn_norm)), h, c.sandwich_norms)?,
            ffn_norm: loader.vector(&p(&format!("{}.weight", names.ffn_norm)), h)?,
            post_ffn_norm: loader.optional_vector(&p(&format!("{}.weight", names.post_ffn_norm)), h, c.sandwich_norms)?,
            mlp,
        });
    }
    let final_norm = loader.vector("model.norm.weight", h)?;
    // Tied: the head is the embedding, the same vocabulary rows.
    let lm_head = if c.tie_word_embeddings { None } else { Some(loader.stacked(&vocab_rows("lm_head.weight"), h, false)?) };
    Ok(ModelWeights { embed_tokens, layers, final_norm, lm_head, shard })
}

/// The forward of one batch; the logits of the batch's requested rows stay with the backend.
/// `config` is the one the weights' rank runs with (`ShardPlan::local_config`; the model's own at
/// world 1).
pub fn forward<O: Ops>(config: &ModelConfig, weights: &ModelWeights<O::Family>, ops: &mut O) -> Result<(), ModelError> {
    let c = config;
    let norm = Norm { eps: c.rms_norm_eps, unit_offset: c.norm_unit_offset };
    let x = ops.embed(&weights.embed_tokens, weights.shard.vocab.start, c.embedding_multiplier)?;
    // Each rank embedded only the tokens of its vocabulary range, the others as zeros.
    ops.all_reduce(x)?;
    // Each block's output joins the residual inside the next norm.
    let mut delta = None;
    for (i, layer) in weights.layers.iter().enumerate() {
        let h = ops.add_norm(x, delta, &layer.attn_norm, norm)?;
        if let Some(d) = delta {
            ops.free(d);
        }
        let mut attn = attention(c, i, layer, h, norm, ops)?;
        if let Some(post) = &layer.post_attn_norm {
            attn = normed(ops, attn, post, norm)?;
        }
        let h = ops.add_norm(x, Some(attn), &layer.ffn_norm, norm)?;
        ops.free(attn);
        let mut out = match &layer.mlp {
            Mlp::Dense { gate_up, down } => {
                let gate_up = consumed(ops, h, |ops, h| ops.linear(h, gate_up))?;
                let act = consumed(ops, gate_up, |ops, gu| ops.gated_activation(gu, c.hidden_act))?;
                consumed(ops, act, |ops, act| ops.linear(act, down))?
            }
            Mlp::Moe(moe) => {
                let config = c.moe.as_ref().expect("sparse layers have a config");
                consumed(ops, h, |ops, h| ops.moe(h, moe, config, c.hidden_act))?
            }
        };
        // Each rank's down projection covered its slice of the intermediate size; the post-norm
        // (Gemma) norms the sum.
        ops.all_reduce(out)?;
        if let Some(post) = &layer.post_ffn_norm {
            out = normed(ops, out, post, norm)?;
        }
        delta = Some(out);
    }
    ops.logits(x, delta, &weights.final_norm, norm, weights.lm_head(), c.final_logit_softcapping)?;
    // Each rank scored (and soft-capped, which is per logit) its vocabulary range.
    ops.all_gather_logits()
}

/// `f(input)`, then `input` is freed.
fn consumed<O: Ops>(ops: &mut O, input: Act, f: impl FnOnce(&mut O, Act) -> Result<Act, ModelError>) -> Result<Act, ModelError> {
    let out = f(ops, input)?;
    ops.free(input);
    Ok(out)
}

/// `norm(x) * weight`, freeing `x`.
fn normed<O: Ops>(ops: &mut O, x: Act, weight: &Vector<O>, norm: Norm) -> Result<Act, ModelError> {
    consumed(ops, x, |ops, x| ops.norm(x, weight, norm))
}

/// Layer `i`'s attention block on normed input `h` (freed): `[rows, hidden]` out of the
/// o-projection, summed over the ranks (each projected its own heads; a post-norm norms the sum).
fn attention<O: Ops>(c: &ModelConfig, i: usize, layer: &LayerWeights<O::Family>, h: Act, norm: Norm, ops: &mut O) -> Result<Act, ModelError> {
    let qkv = consumed(ops, h, |ops, h| ops.linear(h, &layer.qkv))?;
    if let (Some(q_norm), Some(k_norm)) = (&layer.q_norm, &layer.k_norm) {
        ops.head_norm(qkv, 0, c.num_attention_heads, q_norm, norm)?;
        ops.head_norm(qkv, c.num_attention_heads, c.num_key_value_heads, k_norm, norm)?;
    }
    let spec = c.layer_attention(i);
    ops.rope_and_cache(qkv, i, &spec)?;
    let out = consumed(ops, qkv, |ops, qkv| ops.attention(qkv, i, &spec))?;
    let projected = consumed(ops, out, |ops, out| ops.linear(out, &layer.o_proj))?;
    ops.all_reduce(projected)?;
    Ok(projected)
}
