//! Tensor parallelism's shard plan: for a `ModelConfig` and one rank of `world`, which rows and
//! columns of every weight that rank holds, and the rank-local sizes its forward runs with. It
//! owns the arithmetic of the split and its refusals; `arch::decoder` states which weight splits
//! which way, `weights::Loader` reads the slices, and a backend's `Ops` sums and gathers across
//! the ranks (`Ops::all_reduce`, `Ops::all_gather_logits`).
//!
//! The split is Megatron's, as vLLM does it:
//! - attention: each rank takes a contiguous run of query heads and of key/value heads; when there
//!   are fewer key/value heads than ranks, each is replicated on `world / kv_heads` neighbouring
//!   ranks (rank `r` holds kv head `r / (world / kv_heads)`). The Q, K and V rows (and biases) of a
//!   rank's heads are column-parallel; `o_proj` takes the columns of its query heads
//!   (row-parallel), and the ranks' partial outputs are summed.
//! - MLP: the gate and up rows of a slice of the intermediate size (column-parallel), the same
//!   columns of `down` (row-parallel, summed). A mixture of experts splits every expert this way
//!   by the experts' intermediate size; the router is replicated.
//! - vocabulary: the embedding and the LM head (the same matrix when tied) are split by token id,
//!   in contiguous ranges of `ceil(vocab / world)`, the last possibly shorter. A rank embeds the
//!   tokens of its range (zeros for the others, summed across ranks) and scores its range (the
//!   logits are gathered).
//! - norms (q/k norms too) are replicated.
//!
//! A bias of a row-parallel matrix would be added once, by rank 0 (`weights::Loader`).

use std::ops::Range;

use super::{ModelConfig, ModelError};

/// One rank of a tensor-parallel group of `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorParallel {
    pub rank: usize,
    pub world: usize,
}

impl TensorParallel {
    /// No parallelism: the one rank holds the whole model.
    pub const SINGLE: TensorParallel = TensorParallel { rank: 0, world: 1 };

    pub fn new(rank: usize, world: usize) -> Result<Self, ModelError> {
        if world == 0 || rank >= world {
            return Err(ModelError::Config(format!("tensor-parallel rank {rank} of a world of {world}")));
        }
        Ok(TensorParallel { rank, world })
    }

    /// Every rank of a world of `world`.
    pub fn ranks(world: usize) -> Result<Vec<Self>, ModelError> {
        if world == 0 {
            return Err(ModelError::Config("a tensor-parallel world of 0 ranks".into()));
        }
        (0..world).map(|rank| TensorParallel::new(rank, world)).collect()
    }

    /// The `rank`-th of `world` equal contiguous parts of `0..total` (`total` divisible).
    fn even_part(self, total: usize) -> Range<usize> {
        let per = total / self.world;
        self.rank * per..(self.rank + 1) * per
    }
}

/// What one rank holds of a model (see the module docs). Ranges of heads and of sizes are in the
/// whole model's numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub parallel: TensorParallel,
    pub head_dim: usize,
    /// The whole model's query and key/value heads.
    pub total_q_heads: usize,
    pub total_kv_heads: usize,
    /// This rank's query heads.
    pub q_heads: Range<usize>,
    /// This rank's key/value heads: its own run, or the one head it shares with its neighbours.
    pub kv_heads: Range<usize>,
    /// The whole model's dense intermediate size.
    pub total_intermediate: usize,
    /// This rank's slice of the dense MLPs' intermediate size; `None` when no layer is dense.
    pub intermediate: Option<Range<usize>>,
    /// This rank's slice of every expert's intermediate size; `None` without experts.
    pub expert_intermediate: Option<Range<usize>>,
    /// The token ids whose embedding and logits this rank holds.
    pub vocab: Range<usize>,
}

impl ShardPlan {
    /// The plan of `parallel.rank`, or why `config` cannot be split `parallel.world` ways.
    pub fn new(config: &ModelConfig, parallel: TensorParallel) -> Result<Self, ModelError> {
        let c = config;
        let world = parallel.world;
        let refuse = |what: String| ModelError::Config(format!("tensor parallelism over {world} ranks: {what}"));
        let (q, kv) = (c.num_attention_heads, c.num_key_value_heads);
        if q == 0 || kv == 0 || !q.is_multiple_of(kv) {
            return Err(refuse(format!("{q} query heads cannot share {kv} key/value heads evenly")));
        }
        if !q.is_multiple_of(world) {
            return Err(refuse(format!("the {q} query heads do not divide evenly")));
        }
        let kv_heads = kv_heads_of(parallel, kv).ok_or_else(|| {
            refuse(format!("the {kv} key/value heads neither divide evenly nor divide the ranks (to be replicated)"))
        })?;
        let any_dense = (0..c.num_hidden_layers).any(|layer| c.is_dense_layer(layer));
        let intermediate = any_dense.then(|| split_evenly(parallel, c.intermediate_size, "the intermediate size")).transpose().map_err(refuse)?;
        let expert_intermediate = c
            .moe
            .as_ref()
            .map(|moe| split_evenly(parallel, moe.expert_intermediate_size, "the experts' intermediate size"))
            .transpose()
            .map_err(refuse)?;
        let vocab = vocab_range(parallel, c.vocab_size).ok_or_else(|| refuse(format!("a vocabulary of {} leaves a rank no token", c.vocab_size)))?;
        let plan = ShardPlan {
            parallel,
            head_dim: c.head_dim,
            total_q_heads: q,
            total_kv_heads: kv,
            q_heads: parallel.even_part(q),
            kv_heads,
            total_intermediate: c.intermediate_size,
            intermediate,
            expert_intermediate,
            vocab,
        };
        plan.check_gqa_mapping().map_err(refuse)?;
        Ok(plan)
    }

    /// Every rank's plan.
    pub fn all(config: &ModelConfig, world: usize) -> Result<Vec<Self>, ModelError> {
        TensorParallel::ranks(world)?.into_iter().map(|parallel| ShardPlan::new(config, parallel)).collect()
    }

    /// Grouped-query attention on the rank's own heads must pair each of its query heads with
    /// the key/value head the whole model pairs it with: local query head `i` reads local kv head
    /// `i / (local q / local kv)`, as every backend's attention does.
    fn check_gqa_mapping(&self) -> Result<(), String> {
        let group = self.total_q_heads / self.total_kv_heads;
        let local_group = self.q_heads.len() / self.kv_heads.len();
        for (local, head) in self.q_heads.clone().enumerate() {
            let wanted = head / group;
            if !self.kv_heads.contains(&wanted) || wanted - self.kv_heads.start != local / local_group {
                return Err(format!("query head {head} would read the wrong key/value head (it needs {wanted}; the rank holds {:?})", self.kv_heads));
            }
        }
        Ok(())
    }

    /// The rank's rows of a `[q_size, _]` projection (its query heads).
    pub fn q_rows(&self) -> Range<usize> {
        self.heads_rows(&self.q_heads)
    }

    /// The rank's rows of a `[kv_size, _]` projection (its key/value heads).
    pub fn kv_rows(&self) -> Range<usize> {
        self.heads_rows(&self.kv_heads)
    }

    /// The rank's rows of a fused `[q | k | v]` projection (Phi-3's `qkv_proj`), section by section.
    pub fn qkv_rows(&self) -> Vec<Range<usize>> {
        let (q_size, kv_size) = (self.total_q_heads * self.head_dim, self.total_kv_heads * self.head_dim);
        vec![self.q_rows(), offset(self.kv_rows(), q_size), offset(self.kv_rows(), q_size + kv_size)]
    }

    /// The rank's rows of a fused `[gate | up]` dense projection (Phi-3's `gate_up_proj`), half by
    /// half.
    pub fn gate_up_rows(&self) -> Vec<Range<usize>> {
        let rows = self.intermediate.clone().expect("a dense MLP has an intermediate slice");
        vec![rows.clone(), offset(rows, self.total_intermediate)]
    }

    fn heads_rows(&self, heads: &Range<usize>) -> Range<usize> {
        heads.start * self.head_dim..heads.end * self.head_dim
    }

    /// The configuration this rank's forward runs with: its own query and key/value heads and
    /// intermediate sizes; everything else (the vocabulary included: its forward takes and gives
    /// whole-vocabulary token ids and logits) as `config`, the whole model's.
    pub fn local_config(&self, config: &ModelConfig) -> ModelConfig {
        debug_assert_eq!((config.num_attention_heads, config.num_key_value_heads), (self.total_q_heads, self.total_kv_heads));
        let mut local = config.clone();
        local.num_attention_heads = self.q_heads.len();
        local.num_key_value_heads = self.kv_heads.len();
        if let Some(slice) = &self.intermediate {
            local.intermediate_size = slice.len();
        }
        if let (Some(moe), Some(slice)) = (local.moe.as_mut(), &self.expert_intermediate) {
            moe.expert_intermediate_size = slice.len();
        }
        local
    }
}

/// `range` moved `by` on.
fn offset(range: Range<usize>, by: usize) -> Range<usize> {
    range.start + by..range.end + by
}

/// The rank's key/value heads: a contiguous run when they divide evenly, else (fewer heads than
/// ranks, the ranks a multiple of them) the one head of its run of `world / kv` ranks.
fn kv_heads_of(parallel: TensorParallel, kv: usize) -> Option<Range<usize>> {
    if kv.is_multiple_of(parallel.world) {
        Some(parallel.even_part(kv))
    } else if parallel.world.is_multiple_of(kv) {
        let head = parallel.rank / (parallel.world / kv);
        Some(head..head + 1)
    } else {
        None
    }
}

fn split_evenly(parallel: TensorParallel, total: usize, what: &str) -> Result<Range<usize>, String> {
    if total.is_multiple_of(parallel.world) {
        Ok(parallel.even_part(total))
    } else {
        Err(format!("{what} ({total}) does not divide evenly"))
    }
}

/// The ids each of `world` ranks' vocabulary ranges holds, the last rank's possibly fewer: what
/// a device's gather of the ranks' logits pads every range to.
pub fn vocab_per_rank(vocab: usize, world: usize) -> usize {
    vocab.div_ceil(world)
}

/// Contiguous ranges of `ceil(vocab / world)` ids, the last possibly shorter; `None` when one
/// would be empty.
fn vocab_range(parallel: TensorParallel, vocab: usize) -> Option<Range<usize>> {
    let per = vocab_per_rank(vocab, parallel.world);
    let start = parallel.rank * per;
    (start < vocab).then(|| start..(start + per).min(vocab))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::MoeConfig;
    use crate::model::Arch;

    /// 8 query heads of 4 dims, `kv` key/value heads, intermediate 24, vocabulary 100.
    fn config(kv: usize) -> ModelConfig {
        ModelConfig::dense(Arch::Llama, 16, 24, 2, 8, kv, 4, 100).unwrap()
    }

    fn plans(config: &ModelConfig, world: usize) -> Vec<ShardPlan> {
        ShardPlan::all(config, world).unwrap_or_else(|e| panic!("world {world}: {e}"))
    }

    fn refusal(config: &ModelConfig, world: usize) -> String {
        ShardPlan::all(config, world).expect_err("the split is refused").to_string()
    }

    #[test]
    fn heads_split_contiguously_and_kv_heads_are_replicated_when_fewer_than_ranks() {
        let split = plans(&config(4), 2);
        assert_eq!((split[1].q_heads.clone(), split[1].kv_heads.clone()), (4..8, 2..4));
        assert_eq!((split[1].q_rows(), split[1].kv_rows()), (16..32, 8..16));
        // Two kv heads over eight ranks: each head on four neighbouring ranks.
        let replicated = plans(&config(2), 8);
        let kv: Vec<_> = replicated.iter().map(|p| p.kv_heads.clone()).collect();
        assert_eq!(kv, [0..1, 0..1, 0..1, 0..1, 1..2, 1..2, 1..2, 1..2]);
        assert!(replicated.iter().all(|p| p.q_heads.len() == 1));
        // A rank's q heads read its kv head: q head 5 is in group 1 (heads 4..8).
        assert_eq!(replicated[5].q_heads, 5..6);
    }

    #[test]
    fn fused_sections_take_each_sections_rows() {
        let plan = &plans(&config(4), 2)[1];
        // q 32 rows, k and v 16 each; rank 1 takes the second half of each.
        assert_eq!(plan.qkv_rows(), [16..32, 40..48, 56..64]);
        assert_eq!(plan.gate_up_rows(), [12..24, 36..48]);
    }

    #[test]
    fn world_one_is_the_whole_model() {
        let mut c = config(2);
        c.moe = Some(MoeConfig { num_experts: 4, top_k: 2, expert_intermediate_size: 6, norm_topk_prob: true, dense_layers: vec![1] });
        let plan = ShardPlan::new(&c, TensorParallel::SINGLE).unwrap();
        assert_eq!((plan.q_heads, plan.kv_heads, plan.vocab), (0..8, 0..2, 0..100));
        assert_eq!((plan.intermediate, plan.expert_intermediate), (Some(0..24), Some(0..6)));
        assert_eq!(ShardPlan::new(&c, TensorParallel::SINGLE).unwrap().local_config(&c), c);
    }

    #[test]
    fn the_local_config_has_the_ranks_sizes() {
        let mut c = config(2);
        c.moe = Some(MoeConfig { num_experts: 4, top_k: 2, expert_intermediate_size: 6, norm_topk_prob: true, dense_layers: vec![1] });
        let local = plans(&c, 2)[1].local_config(&c);
        assert_eq!((local.num_attention_heads, local.num_key_value_heads, local.intermediate_size), (4, 1, 12));
        assert_eq!(local.moe.as_ref().unwrap().expert_intermediate_size, 3);
        assert_eq!((local.vocab_size, local.hidden_size, local.head_dim), (100, 16, 4));
        local.validate().unwrap();
    }

    #[test]
    fn vocabulary_ranges_are_contiguous_the_last_shorter() {
        let mut c = config(4);
        c.vocab_size = 10;
        let ranges: Vec<_> = plans(&c, 4).iter().map(|p| p.vocab.clone()).collect();
        assert_eq!(ranges, [0..3, 3..6, 6..9, 9..10]);
        let ranges: Vec<_> = plans(&c, 2).iter().map(|p| p.vocab.clone()).collect();
        assert_eq!(ranges, [0..5, 5..10]);
        // Ten ids over eight ranks: ranges of two leave the last ranks nothing.
        assert!(refusal(&c, 8).contains("vocabulary of 10"), "{}", refusal(&c, 8));
    }

    #[test]
    fn splits_that_do_not_divide_are_refused() {
        assert!(refusal(&config(4), 3).contains("8 query heads"), "{}", refusal(&config(4), 3));
        // Four kv heads over eight ranks are replicated; six over four neither divide nor are
        // divided.
        plans(&config(4), 8);
        let mut c = ModelConfig::dense(Arch::Llama, 16, 24, 2, 12, 6, 4, 100).unwrap();
        assert!(refusal(&c, 4).contains("6 key/value heads"), "{}", refusal(&c, 4));
        c = config(4);
        c.intermediate_size = 18;
        assert!(refusal(&c, 4).contains("intermediate size (18)"), "{}", refusal(&c, 4));
        c.moe = Some(MoeConfig { num_experts: 4, top_k: 2, expert_intermediate_size: 6, norm_topk_prob: true, dense_layers: vec![] });
        // No dense layer: the dense size does not matter, the experts' does.
        assert!(refusal(&c, 4).contains("experts' intermediate size (6)"), "{}", refusal(&c, 4));
        assert!(TensorParallel::new(2, 2).is_err() && TensorParallel::ranks(0).is_err());
    }

    #[test]
    fn every_query_head_reads_its_own_key_value_head() {
        for (kv, world) in [(8, 8), (4, 2), (4, 8), (2, 4), (1, 8), (2, 2)] {
            for plan in plans(&config(kv), world) {
                let (group, local_group) = (8 / kv, plan.q_heads.len() / plan.kv_heads.len());
                for (i, head) in plan.q_heads.clone().enumerate() {
                    assert_eq!(plan.kv_heads.start + i / local_group, head / group, "kv {kv}, world {world}");
                }
            }
        }
        // A plan whose heads do not line up is refused by the check itself.
        let mut plan = plans(&config(2), 4)[1].clone();
        plan.kv_heads = 1..2;
        assert!(plan.check_gqa_mapping().unwrap_err().contains("query head 2"));
    }
}
