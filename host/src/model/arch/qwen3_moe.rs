//! `Qwen3MoeForCausalLM`: Qwen3's attention (q/k norms) with a sparse mixture of experts as the
//! MLP: a router picks each token's `num_experts_per_tok` experts out of `num_experts`, weighted by
//! its softmax (renormalised over the chosen ones with `norm_topk_prob`). Layers listed in
//! `mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense MLP.

use super::gguf_meta::GgufMeta;
use super::hf::HfConfig;
use super::qwen3::qwen3_family;
use super::Arch;
use crate::model::config::MoeConfig;
use crate::model::{ModelConfig, ModelError};

pub fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig, ModelError> {
    let mut c = qwen3_family(hf, Arch::Qwen3Moe)?;
    // transformers 5 writes `num_local_experts`; released checkpoints say `num_experts`.
    let num_experts = hf.opt_usize("num_experts").or(hf.opt_usize("num_local_experts")).unwrap_or(0);
    let step = hf.opt_usize("decoder_sparse_step").unwrap_or(1).max(1);
    let mlp_only: Vec<usize> = hf
        .get("mlp_only_layers")
        .and_then(|v| v.as_array())
        .map(|l| l.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect())
        .unwrap_or_default();
    if num_experts == 0 {
        return Err(ModelError::Config("config.json: `num_experts` is missing or zero".into()));
    }
    c.moe = Some(MoeConfig {
        num_experts,
        top_k: hf.usize("num_experts_per_tok")?,
        expert_intermediate_size: hf.usize("moe_intermediate_size")?,
        norm_topk_prob: hf.opt_bool("norm_topk_prob").unwrap_or(false),
        dense_layers: (0..c.num_hidden_layers).filter(|&i| mlp_only.contains(&i) || (i + 1) % step != 0).collect(),
    });
    Ok(c)
}

pub fn config_from_gguf(meta: &GgufMeta<'_>) -> Result<ModelConfig, ModelError> {
    let mut c = meta.decoder(Arch::Qwen3Moe)?;
    c.qk_norm = true;
    c.sliding_window = None;
    c.moe = Some(MoeConfig {
        num_experts: meta.usize("expert_count")?,
        top_k: meta.usize("expert_used_count")?,
        expert_intermediate_size: meta.usize("expert_feed_forward_length")?,
        // llama.cpp always renormalises Qwen3-MoE's chosen weights, as its checkpoints ask.
        norm_topk_prob: meta.opt_bool("expert_weights_norm").unwrap_or(true),
        // A layer without a router is dense (llama.cpp's own files have none such).
        dense_layers: (0..c.num_hidden_layers).filter(|i| !meta.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight"))).collect(),
    });
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_experts_and_dense_layers() {
        let j = json!({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": true,
            "decoder_sparse_step": 2, "mlp_only_layers": [3]});
        let c = Arch::Qwen3Moe.config_from_hf(&HfConfig::new(j)).unwrap();
        let moe = c.moe.as_ref().unwrap();
        assert_eq!((moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.norm_topk_prob), (8, 2, 32, true));
        // Sparse: layers 1 and 3 by the stride, but 3 is listed as dense.
        assert_eq!(moe.dense_layers, vec![0, 2, 3]);
        assert!(c.qk_norm && !c.is_dense_layer(1) && c.is_dense_layer(3));
    }
}
