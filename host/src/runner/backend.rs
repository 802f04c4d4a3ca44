//! The seam between the engine and a model backend: run a `ForwardBatch` against the backend's
//! own KV-cache memory (returning logits, or sampled tokens), and copy blocks for copy-on-write.
//! The CPU backend is the reference; the CUDA backend implements the same trait.

use crate::kv_cache::{BlockId, KvCacheLayout};
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

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        (**self).step_phases()
    }
}

pub struct CpuBackend {
    model: CpuModel,
    cache: CpuKvCache,
    sampling: HostSampling,
}

impl CpuBackend {
    pub fn new(model: CpuModel, num_blocks: usize, block_size: usize) -> Self {
        let cache = CpuKvCache::new(model.kv_layout(num_blocks, block_size));
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

    fn step_phases(&self) -> &[(&'static str, Duration)] {
        self.inner.step_phases()
    }
}
