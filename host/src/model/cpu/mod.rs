//! The CPU backend, in float32: the reference every other backend is checked against. It
//! implements the operations of `model::ops` (`forward::CpuOps`) and runs any architecture of
//! `model::arch` through them over a paged KV cache in host memory.
//!
//! A forward takes a `ForwardBatch` that mixes prefill chunks and decode tokens of many
//! sequences, writes each new token's key and value into its cache slot, and returns the logits
//! of the rows the batch asks for. `parallel` runs a model split across tensor-parallel ranks,
//! each a `CpuModel` holding its shard.

mod attention;
mod forward;
mod kv_storage;
pub mod matmul;
pub mod ops;
pub mod parallel;
mod weights;

use std::sync::Arc;

pub use self::attention::{paged_attention, AttentionShape};
pub use self::forward::CpuOps;
pub use self::kv_storage::{CpuKvCache, KvRows};
pub use self::parallel::CpuTensorParallelModel;
pub use self::weights::{CpuMatrix, CpuStore, CpuWeights};
use self::parallel::Communicator;
use super::parallel::{ShardPlan, TensorParallel};
use super::rope::Rope;
use super::fp8::{Fp8Error, Fp8Matrix, Fp8Report};
use super::weights::{Loader, MatrixRole, ModelWeights, WeightSource, WeightStore};
use super::{ModelConfig, ModelError};
use crate::kv_cache::KvCacheLayout;
use crate::runner::ForwardBatch;

/// Cheap to clone: clones share the weights. The whole model, or one tensor-parallel rank's shard
/// (`load_shard`; it runs within a `CpuTensorParallelModel`).
#[derive(Clone)]
pub struct CpuModel {
    /// The configuration the forward runs with: a shard's `ShardPlan::local_config`.
    config: ModelConfig,
    weights: Arc<ModelWeights<CpuWeights>>,
    ropes: Arc<Vec<Rope>>,
}

impl CpuModel {
    pub fn new(config: ModelConfig, weights: ModelWeights<CpuWeights>) -> Self {
        let ropes = Arc::new(Rope::tables(&config));
        CpuModel { config, weights: Arc::new(weights), ropes }
    }

    /// Every weight of `config`'s architecture from `source`; matrices pass through `round` when
    /// given (e.g. to bfloat16 and back, to compare with a device that stores them so).
    pub fn load(config: ModelConfig, source: &dyn WeightSource, round: Option<fn(f32) -> f32>) -> Result<Self, ModelError> {
        Self::load_shard(config, source, round, TensorParallel::SINGLE)
    }

    /// As `load`, rank `parallel.rank`'s shard only (`model::parallel`), to run with its local
    /// configuration; at world 1, the whole model.
    pub fn load_shard(config: ModelConfig, source: &dyn WeightSource, round: Option<fn(f32) -> f32>, parallel: TensorParallel) -> Result<Self, ModelError> {
        let local = ShardPlan::new(&config, parallel)?.local_config(&config);
        let mut store = CpuStore { round };
        // For progress only: the shard's size but for its vocabulary rows, counted whole.
        let total = local.num_parameters() as u64 * CpuStore::BYTES_PER_ELEMENT;
        let mut loader = Loader::new(source, &mut store).with_shard(parallel).with_progress(total);
        let weights = config.architecture.load(&config, &mut loader)?;
        Ok(CpuModel::new(local, weights))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weights(&self) -> &ModelWeights<CpuWeights> {
        &self.weights
    }

    /// A copy with every matrix passed through `f` (norm weights and biases unchanged): e.g. the
    /// weights rounded to bfloat16, to judge the GPU's arithmetic apart from its weight precision.
    pub fn map_matrices(&self, f: impl Fn(f32) -> f32 + Sync) -> CpuModel {
        let matrix = |w: &CpuMatrix| Ok::<_, ()>(CpuMatrix { data: w.data.iter().map(|&v| f(v)).collect(), ..w.clone() });
        let vector = |v: &Vec<f32>| Ok(v.clone());
        let weights = self.weights.try_map::<CpuWeights, ()>(&matrix, &vector).expect("mapping cannot fail");
        CpuModel::new(self.config.clone(), weights)
    }

    /// A copy whose layer projections hold what FP8 weights with per-channel scales hold
    /// (`model::fp8`: quantized, then read back), the embeddings, head, routers and norms as they
    /// are; with the error the quantization made. Its forward is an FP8-weight forward up to
    /// accumulation order: the reference for the format's quality.
    pub fn with_fp8_projections(&self) -> Result<(CpuModel, Fp8Report), Fp8Error> {
        let report = std::sync::Mutex::new(Fp8Report::default());
        let matrix = |role: MatrixRole, w: &CpuMatrix| {
            if role != MatrixRole::Projection {
                return Ok(w.clone());
            }
            let data = Fp8Matrix::quantize(&w.data, w.rows, w.cols)?.dequantize();
            report.lock().unwrap_or_else(|e| e.into_inner()).add(&w.data, &data);
            Ok(CpuMatrix { rows: w.rows, cols: w.cols, data, bias: w.bias.clone() })
        };
        let vector = |v: &Vec<f32>| Ok(v.clone());
        let weights = self.weights.try_map_by_role::<CpuWeights, Fp8Error>(&matrix, &vector)?;
        Ok((CpuModel::new(self.config.clone(), weights), report.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    /// A cache layout for this model with `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvCacheLayout {
        KvCacheLayout::for_model(&self.config, num_blocks, block_size)
    }

    /// Runs `batch` and returns logits `[batch.logits_rows.len(), vocab_size]`.
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut CpuKvCache) -> Result<Vec<f32>, ModelError> {
        let parallel = self.weights.shard.parallel;
        if parallel.world > 1 {
            return Err(ModelError::Input(format!(
                "rank {} of {} is a tensor-parallel shard: it runs with the other ranks (`CpuTensorParallelModel`)",
                parallel.rank, parallel.world
            )));
        }
        self.forward_with(batch, cache, None)
    }

    /// This rank's part of a tensor-parallel forward, meeting the other ranks through
    /// `communicator`: the whole vocabulary's logits, as every rank gets them.
    fn forward_rank(&self, batch: &ForwardBatch, cache: &mut CpuKvCache, communicator: Communicator<'_>) -> Result<Vec<f32>, ModelError> {
        let parallel = self.weights.shard.parallel;
        if (communicator.rank(), communicator.world()) != (parallel.rank, parallel.world) {
            return Err(ModelError::Input(format!(
                "the shard of rank {} of {} given the communicator of rank {} of {}",
                parallel.rank,
                parallel.world,
                communicator.rank(),
                communicator.world()
            )));
        }
        self.forward_with(batch, cache, Some(communicator))
    }

    fn forward_with(&self, batch: &ForwardBatch, cache: &mut CpuKvCache, communicator: Option<Communicator<'_>>) -> Result<Vec<f32>, ModelError> {
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
        let mut ops = CpuOps::new(c, &self.ropes, batch, cache).with_communicator(communicator);
        c.architecture.forward(c, &self.weights, &mut ops)?;
        Ok(ops.into_logits())
    }
}
