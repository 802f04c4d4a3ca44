//! Tensor parallelism served on the CPU (`--tensor-parallel-size N`, issue 14): a `ModelBackend`
//! over `CpuTensorParallelModel`, whose ranks run as threads. The engine keeps ONE scheduler and
//! ONE KV-cache manager: every rank holds a cache of the same blocks (its own key/value heads'
//! slice of each), so a single block table and slot mapping serve them all, and copy-on-write
//! copies a block on every rank. The ranks' logits are gathered whole, so sampling (constraints,
//! plugins) runs on the host exactly as on `CpuBackend`.

use std::time::Duration;

use super::backend::HostSampling;
use crate::kv_cache::{BlockId, KvCacheDtype, KvCacheLayout};
use crate::model::cpu::{CpuKvCache, CpuTensorParallelModel};
use crate::model::{ModelConfig, ModelError};
use crate::runner::{ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, SampledRow};

pub struct CpuTensorParallelBackend {
    model: CpuTensorParallelModel,
    /// One per rank, all with the same number and size of blocks.
    caches: Vec<CpuKvCache>,
    /// The whole model's layout over the shared blocks: what the engine's block accounting reads
    /// (a rank's own cache holds only its key/value heads).
    layout: KvCacheLayout,
    sampling: HostSampling,
}

impl CpuTensorParallelBackend {
    pub fn new(model: CpuTensorParallelModel, num_blocks: usize, block_size: usize, dtype: KvCacheDtype) -> Self {
        let caches = model.kv_caches(num_blocks, block_size, dtype);
        let layout = KvCacheLayout::for_model(model.config(), num_blocks, block_size);
        CpuTensorParallelBackend { model, caches, layout, sampling: HostSampling::default() }
    }

    pub fn world(&self) -> usize {
        self.model.world()
    }

    /// Bytes one block of `block_size` tokens of `dtype` takes over all of `model`'s ranks, to
    /// size the cache before it exists: more than the whole model's when key/value heads are
    /// replicated across ranks.
    pub fn block_bytes(model: &CpuTensorParallelModel, block_size: usize, dtype: KvCacheDtype) -> usize {
        model.ranks().iter().map(|rank| CpuKvCache::bytes_for(&rank.kv_layout(1, block_size), dtype)).sum()
    }
}

impl ModelBackend for CpuTensorParallelBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        for cache in &mut self.caches {
            for &(src, dst) in copies {
                cache.copy_block(src as usize, dst as usize);
            }
        }
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        self.model.forward(batch, &mut self.caches)
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        let logits = self.forward(batch)?;
        Ok(self.sampling.sample(&logits, self.model.config().vocab_size, rows))
    }

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        self.sampling.step_phases()
    }
}

#[cfg(test)]
#[path = "cpu_parallel_tests.rs"]
mod tests;
