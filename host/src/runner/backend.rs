//! The seam between the engine and a model backend: run a `ForwardBatch` against the backend's
//! own KV-cache memory (returning logits, or sampled tokens), and copy blocks for copy-on-write.
//! The CPU backend is the reference; the CUDA backend implements the same trait.
//!
//! Pipelining (async scheduling): a backend that says it is `pipelined` splits `forward_sampled`
//! into `launch`, which returns once the step is enqueued, and `collect`, which waits for its
//! results; the engine schedules and launches step N+1 between the two halves of step N, its
//! decode tokens fed from step N's samples on the device (`FedToken`). `HostPipeline` gives any
//! backend the same interface, running each launch to the end (no overlap: for testing the
//! engine's pipelined path on the CPU).

use crate::kv_cache::{BlockId, KvCacheDtype, KvCacheLayout};
use crate::model::cpu::{CpuKvCache, CpuModel};
use crate::model::{ModelConfig, ModelError};
use crate::runner::ForwardBatch;
use std::time::Duration;

use crate::sampling::{prepare_constraints, sample_rows_host, RowSampling, SampledRow};

pub trait ModelBackend: Send {
    fn config(&self) -> &ModelConfig;

    fn kv_layout(&self) -> &KvCacheLayout;

    /// Copies whole blocks (every layer, keys and values), `(source, destination)` pairs in order.
    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]);

    /// Runs the batch and returns logits `[batch.logits_rows.len(), vocab_size]`.
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError>;

    /// Runs the batch and samples: one result per entry of `rows`, in order (see
    /// `sampling::RowSampling` for what a row asks and how its sampler is updated). The default
    /// copies the logits to the host and samples there with the native samplers (the reference);
    /// a device backend samples where the logits are and returns only the results.
    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        let logits = self.forward(batch)?;
        prepare_constraints(rows);
        Ok(sample_rows_host(&logits, self.config().vocab_size, rows))
    }

    /// Whether `launch` and `collect` are implemented (see the module header).
    fn pipelined(&self) -> bool {
        false
    }

    /// Enqueues the batch's forward and the sampling of `rows`, resolving its fed tokens from the
    /// previous launch's samples, and returns without waiting for the results. At most two
    /// launches are outstanding; `collect` takes them in order.
    fn launch(&mut self, _batch: &ForwardBatch, _rows: &mut [RowSampling<'_>]) -> Result<(), ModelError> {
        Err(ModelError::Input("this backend does not pipeline steps".into()))
    }

    /// Waits for the oldest outstanding launch and returns its results, one per row; `rows` are
    /// that launch's samplers in the same order (token results are `observe`d by them, as in
    /// `forward_sampled`).
    fn collect(&mut self, _rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        Err(ModelError::Input("this backend does not pipeline steps".into()))
    }

    /// Where the last `forward_sampled` spent its time, by named phase, for the engine's
    /// `engine_step_phase_seconds`: `constraint_masks` (the wall time of the step's grammar masks:
    /// overlapped with the forward on the GPU, after it on the CPU) and whatever else the backend
    /// measures (the GPU's host-side sampling work and, on some steps, its device times).
    fn step_phases(&self) -> &[(&'static str, Duration)] {
        &[]
    }
}

/// What the CPU backends do with a step's logits: the native samplers on the host, timing the
/// step's grammar masks for `step_phases`.
#[derive(Default)]
pub(super) struct HostSampling {
    /// `constraint_masks` of the last step, if it had any.
    step_phases: Vec<(&'static str, Duration)>,
}

impl HostSampling {
    /// One result per entry of `rows`, from `logits` `[rows, vocab]`.
    pub(super) fn sample(&mut self, logits: &[f32], vocab: usize, rows: &mut [RowSampling<'_>]) -> Vec<SampledRow> {
        let mask_time = prepare_constraints(rows);
        self.step_phases.clear();
        if !mask_time.is_zero() {
            self.step_phases.push(("constraint_masks", mask_time));
        }
        sample_rows_host(logits, vocab, rows)
    }

    pub(super) fn step_phases(&self) -> &[(&'static str, Duration)] {
        &self.step_phases
    }
}

/// A boxed backend is one, so the offline `Generator` runs whichever backend a command built.
impl<B: ModelBackend + ?Sized> ModelBackend for Box<B> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        (**self).kv_layout()
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        (**self).copy_blocks(copies)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        (**self).forward(batch)
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        (**self).forward_sampled(batch, rows)
    }

    fn pipelined(&self) -> bool {
        (**self).pipelined()
    }

    fn launch(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<(), ModelError> {
        (**self).launch(batch, rows)
    }

    fn collect(&mut self, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        (**self).collect(rows)
    }

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        (**self).step_phases()
    }
}

/// Any backend behind the pipelined interface: each `launch` runs the step to the end, its fed
/// tokens taken from the previous launch's results on the host, and `collect` hands back the
/// results in order. No overlap; it lets the engine's pipelined path run on the CPU reference.
pub struct HostPipeline {
    inner: Box<dyn ModelBackend>,
    outstanding: std::collections::VecDeque<Vec<SampledRow>>,
    /// The last launch's sampled token per row (`None` for a row that gave candidates).
    last_tokens: Vec<Option<u32>>,
}

impl HostPipeline {
    pub fn new(inner: Box<dyn ModelBackend>) -> Self {
        HostPipeline { inner, outstanding: Default::default(), last_tokens: Vec::new() }
    }
}

impl ModelBackend for HostPipeline {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        self.inner.kv_layout()
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        self.inner.copy_blocks(copies)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        self.inner.forward(batch)
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        self.inner.forward_sampled(batch, rows)
    }

    fn pipelined(&self) -> bool {
        true
    }

    fn launch(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<(), ModelError> {
        let last_tokens = std::mem::take(&mut self.last_tokens);
        let resolved;
        let batch = if batch.fed.is_empty() {
            batch
        } else {
            let mut copy = batch.clone();
            copy.resolve_fed(&last_tokens).map_err(|e| ModelError::Input(e.to_string()))?;
            resolved = copy;
            &resolved
        };
        if batch.has_placeholders() {
            return Err(ModelError::Input("a placeholder token without a fed sample".into()));
        }
        let results = self.inner.forward_sampled(batch, rows)?;
        self.last_tokens = results
            .iter()
            .map(|r| match r {
                SampledRow::Token(s) => Some(s.token),
                SampledRow::Candidates { .. } => None,
            })
            .collect();
        self.outstanding.push_back(results);
        Ok(())
    }

    fn collect(&mut self, _rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        // The samplers observed their tokens when the launch sampled them.
        self.outstanding.pop_front().ok_or_else(|| ModelError::Input("collect without a launch".into()))
    }

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        self.inner.step_phases()
    }
}

pub struct CpuBackend {
    model: CpuModel,
    cache: CpuKvCache,
    sampling: HostSampling,
}

impl CpuBackend {
    /// A float32 cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: CpuModel, num_blocks: usize, block_size: usize) -> Self {
        Self::with_kv_cache(model, num_blocks, block_size, KvCacheDtype::Auto)
    }

    /// A cache whose values are `dtype`.
    pub fn with_kv_cache(model: CpuModel, num_blocks: usize, block_size: usize, dtype: KvCacheDtype) -> Self {
        let cache = CpuKvCache::with_dtype(model.kv_layout(num_blocks, block_size), dtype);
        CpuBackend { model, cache, sampling: HostSampling::default() }
    }
}

impl ModelBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        self.cache.layout()
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        for &(src, dst) in copies {
            self.cache.copy_block(src as usize, dst as usize);
        }
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        self.model.forward(batch, &mut self.cache)
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        let logits = self.model.forward(batch, &mut self.cache)?;
        Ok(self.sampling.sample(&logits, self.model.config().vocab_size, rows))
    }

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        self.sampling.step_phases()
    }
}

/// A backend whose forward passes fail once `succeed` of them have run (`serve
/// --inject-forward-fault N`, hidden: a testing aid, so that the engine's failure paths run
/// against the real model and the real server).
pub struct FaultyBackend {
    inner: Box<dyn ModelBackend>,
    succeed: usize,
}

impl FaultyBackend {
    pub fn new(inner: Box<dyn ModelBackend>, succeed: usize) -> Self {
        FaultyBackend { inner, succeed }
    }

    fn pass(&mut self) -> Result<(), ModelError> {
        match self.succeed.checked_sub(1) {
            Some(left) => {
                self.succeed = left;
                Ok(())
            }
            None => Err(ModelError::Input("injected fault (--inject-forward-fault)".into())),
        }
    }
}

impl ModelBackend for FaultyBackend {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        self.inner.kv_layout()
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        self.inner.copy_blocks(copies)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        self.pass()?;
        self.inner.forward(batch)
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        self.pass()?;
        self.inner.forward_sampled(batch, rows)
    }

    fn pipelined(&self) -> bool {
        self.inner.pipelined()
    }

    fn launch(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<(), ModelError> {
        self.pass()?;
        self.inner.launch(batch, rows)
    }

    fn collect(&mut self, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        self.inner.collect(rows)
    }

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        self.inner.step_phases()
    }
}
