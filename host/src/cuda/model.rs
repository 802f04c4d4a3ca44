//! The GPU model and backend, with the CPU path's batch contract: a `ForwardBatch` mixing prefill
//! chunks and decode tokens, keys and values written through the slot mapping into a paged cache
//! `[num_blocks, num_kv_heads, block_size, head_dim]` per layer, logits for the requested rows.
//!
//! All work goes to one stream; every launch takes raw device pointers. The pieces live beside
//! this file: the forward over `model::ops` (`forward`), the weights (`weights`), the paged cache
//! (`kv_cache`), the per-batch buffers and index upload (`batch`), attention launches
//! (`attention`) and decode graphs (`graphs`).

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;

use super::batch::{upload_batch, BatchArrays, PinnedStaging, Scratch};
use super::collective::RankComm;
use super::forward::{self, ArenaPlan, Launch, Omit};
use super::kv_cache::GpuKvCache;
use super::launch::{plan_attention, AttentionPath, AttentionSplit, MAX_GQA_GROUP};
use super::sampling::{collect_sampling, launch_sampling};
use super::weights::{GpuMatrix, GpuStore, GpuWeights, MatrixData};
use crate::model::gguf::GgmlType;
use super::{CudaError, GpuDevice};
use crate::kv_cache::{BlockId, KvCacheDtype, KvCacheLayout};
use crate::model::cpu::{CpuMatrix, CpuModel};
use crate::model::parallel::{vocab_per_rank, ShardPlan, TensorParallel};
use crate::model::rope::Rope;
use crate::model::sources::DummySource;
use crate::model::weights::{Loader, ModelWeights, WeightSource, WeightStore};
use crate::model::{ModelConfig, ModelError};
use crate::runner::{ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, SampledRow};

pub struct GpuModel {
    dev: Arc<GpuDevice>,
    config: ModelConfig,
    /// Norm weights hold any (1 + w) offset folded in (`GpuStore::with_unit_offset`).
    weights: ModelWeights<GpuWeights>,
    /// One per `Rope::tables` entry (`LayerAttention::rope` picks).
    ropes: Vec<GpuRope>,
    /// A tensor-parallel rank's end of its NCCL group (`with_collective`); `None` for a whole
    /// model, whose collectives are nothing.
    collective: Option<Arc<RankComm>>,
}

/// A RoPE table on the device (see `model::rope::Rope`).
pub(crate) struct GpuRope {
    pub inv_freq: CudaSlice<f32>,
    pub position_scale: f32,
    pub magnitude: f32,
}

pub(crate) fn ptr<T>(dev: &GpuDevice, slice: &CudaSlice<T>) -> CUdeviceptr {
    slice.device_ptr(&dev.stream).0
}

fn upload_bf16(dev: &GpuDevice, values: &[f32]) -> Result<CudaSlice<bf16>, CudaError> {
    let converted: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    Ok(dev.stream.clone_htod(&converted)?)
}

impl GpuModel {
    /// Uploads the CPU model's weights, rounded to bfloat16 (norm weights and biases stay float32).
    pub fn from_cpu(dev: Arc<GpuDevice>, cpu: &CpuModel) -> Result<Self, CudaError> {
        let config = cpu.config().clone();
        check_supported(&config)?;
        let matrix = |m: &CpuMatrix| -> Result<GpuMatrix, CudaError> {
            Ok(GpuMatrix {
                rows: m.rows,
                cols: m.cols,
                data: MatrixData::Bf16(upload_bf16(&dev, &m.data)?),
                bias: m
                    .bias
                    .as_ref()
                    .map(|b| dev.stream.clone_htod(b))
                    .transpose()?,
            })
        };
        // Norm weights with the (1 + w) offset folded in, as `GpuStore` loads them.
        let offset = if config.norm_unit_offset { 1.0 } else { 0.0 };
        let vector = |v: &Vec<f32>| -> Result<CudaSlice<f32>, CudaError> {
            let folded: Vec<f32> = v.iter().map(|w| w + offset).collect();
            Ok(dev.stream.clone_htod(&folded)?)
        };
        let weights = cpu.weights().try_map::<GpuWeights, CudaError>(&matrix, &vector)?;
        Self::with_weights(dev, config, weights)
    }

    /// Every weight of `config`'s architecture from `source`, straight to the device (see
    /// `cuda::weights`): no host copy of the model is made.
    pub fn load(dev: Arc<GpuDevice>, config: ModelConfig, source: &dyn WeightSource) -> Result<Self, CudaError> {
        Self::load_with(dev, config, source, None)
    }

    /// As `load`; with `keep_quantized`, GGUF layer projections and heads of the kept types stay
    /// quantized on the device (and dummy ones are drawn as blocks of the given type): see
    /// `GpuStore::keeping_quantized`.
    pub fn load_with(dev: Arc<GpuDevice>, config: ModelConfig, source: &dyn WeightSource, keep_quantized: Option<GgmlType>) -> Result<Self, CudaError> {
        Self::load_shard(dev, config, source, keep_quantized, TensorParallel::SINGLE)
    }

    /// As `load_with`, rank `parallel.rank`'s shard only (`model::parallel`), which runs with its
    /// local configuration; at world 1, the whole model. A rank of more than one needs its NCCL
    /// communicator (`with_collective`) before it runs.
    pub fn load_shard(
        dev: Arc<GpuDevice>,
        config: ModelConfig,
        source: &dyn WeightSource,
        keep_quantized: Option<GgmlType>,
        parallel: TensorParallel,
    ) -> Result<Self, CudaError> {
        config.validate().map_err(|e| CudaError::Config(e.to_string()))?;
        let local = ShardPlan::new(&config, parallel)?.local_config(&config);
        check_supported(&local)?;
        let started = std::time::Instant::now();
        let mut store = GpuStore::new(dev.clone()).with_unit_offset(config.norm_unit_offset).keeping_quantized(keep_quantized);
        // For progress only: the shard's size but for its vocabulary rows, counted whole.
        let total = local.num_parameters() as u64 * GpuStore::BYTES_PER_ELEMENT;
        let weights = config
            .architecture
            .load(&config, &mut Loader::new(source, &mut store).with_shard(parallel).with_progress(total))
            .map_err(|e| CudaError::Config(e.to_string()))?;
        dev.stream.synchronize()?;
        tracing::info!(
            gib = format!("{:.2}", store.bytes() as f64 / (1u64 << 30) as f64),
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            dummy = source.is_dummy(),
            rank = parallel.rank,
            world = parallel.world,
            "weights on the GPU"
        );
        Self::with_weights(dev, local, weights)
    }

    /// Deterministic random weights made on the device (`--load-format dummy`): matrices uniform
    /// with standard deviation 0.02, norms ones, biases zeros.
    pub fn dummy(dev: Arc<GpuDevice>, config: ModelConfig, seed: u64) -> Result<Self, CudaError> {
        let source = DummySource::for_model(seed, &config);
        Self::load(dev, config, &source)
    }

    fn with_weights(dev: Arc<GpuDevice>, config: ModelConfig, weights: ModelWeights<GpuWeights>) -> Result<Self, CudaError> {
        let ropes = Rope::tables(&config)
            .into_iter()
            .map(|rope| {
                Ok(GpuRope {
                    inv_freq: dev.stream.clone_htod(rope.inv_freq())?,
                    position_scale: rope.position_scale(),
                    magnitude: rope.magnitude(),
                })
            })
            .collect::<Result<_, CudaError>>()?;
        Ok(GpuModel { ropes, weights, config, dev, collective: None })
    }

    /// Quantizes every dense layer projection (qkv, o_proj, gate_up, down) to FP8 with a scale
    /// per output row, on the device, as vLLM's `--quantization fp8` does (`model::fp8` is the
    /// format; `GpuMatrix::quantize_fp8` the kernel). The embeddings, the head and the norms stay
    /// as they are, as in vLLM; so do a mixture's experts and routers, which the MoE kernels read
    /// in bf16. Products of FP8 weights run through the FP8 GEMV and cuBLASLt's FP8 GEMM
    /// (`cuda::gemm`). Needs sm_89 (Ada) or newer, and rows of a multiple of 16 weights.
    pub fn quantize_fp8(&mut self) -> Result<(), CudaError> {
        let dev = self.dev.clone();
        if dev.compute_capability() < 89 {
            return Err(CudaError::Unavailable(format!("FP8 weights need sm_89 or newer; {} is {}", dev.name, dev.arch)));
        }
        let (mut matrices, mut saved) = (0usize, 0usize);
        for layer in &mut self.weights.layers {
            let mut projections = vec![&mut layer.qkv, &mut layer.o_proj];
            if let crate::model::weights::Mlp::Dense { gate_up, down } = &mut layer.mlp {
                projections.extend([gate_up, down]);
            }
            for m in projections {
                if m.format() == super::launch::WeightFormat::Fp8 {
                    continue;
                }
                if !m.cols.is_multiple_of(16) {
                    return Err(CudaError::Config(format!("FP8 products take rows of a multiple of 16 weights, not {}", m.cols)));
                }
                let before = m.bytes();
                m.quantize_fp8(&dev)?;
                saved += before - m.bytes();
                matrices += 1;
            }
        }
        dev.stream.synchronize()?;
        tracing::info!(
            matrices,
            saved_gib = format!("{:.2}", saved as f64 / (1u64 << 30) as f64),
            "dense projections quantized to FP8 (E4M3, a scale per row)"
        );
        Ok(())
    }

    pub(crate) fn weights(&self) -> &ModelWeights<GpuWeights> {
        &self.weights
    }

    /// Joins this rank to its NCCL group: the forward's all-reduces and its gather of the logits
    /// go through `comm`, which must be this shard's rank of a group of its world. A whole model
    /// may take a group of one, which runs the same path (its collectives copy).
    pub fn with_collective(mut self, comm: Arc<RankComm>) -> Result<Self, CudaError> {
        let parallel = self.weights.shard.parallel;
        if (comm.rank(), comm.world()) != (parallel.rank, parallel.world) {
            return Err(CudaError::Config(format!(
                "the NCCL rank {} of {} for the shard of rank {} of {}",
                comm.rank(),
                comm.world(),
                parallel.rank,
                parallel.world
            )));
        }
        self.collective = Some(comm);
        Ok(self)
    }

    pub(crate) fn collective(&self) -> Option<&Arc<RankComm>> {
        self.collective.as_ref()
    }

    /// Floats per logits row the all-gather of a tensor-parallel rank's logits lands in: every
    /// rank's range padded to the longest (0 without a group).
    pub(crate) fn gathered_logits_width(&self) -> usize {
        self.collective.as_ref().map_or(0, |comm| vocab_per_rank(self.config.vocab_size, comm.world()) * comm.world())
    }

    pub(crate) fn ropes(&self) -> &[GpuRope] {
        &self.ropes
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// The widest input (columns) of any FP8 matrix, 0 without any: the room an FP8 product's
    /// quantized input needs per token.
    pub(crate) fn fp8_width(&self) -> usize {
        self.matrices().filter(|m| m.format() == super::launch::WeightFormat::Fp8).map(|m| m.cols).max().unwrap_or(0)
    }

    /// Elements of the bf16 tile a quantized GGUF product of more rows than the GEMV takes
    /// dequantizes its weight into (`gemm::ggml_linear`): the largest such matrix, at most
    /// `GGML_TILE_ELEMENTS`; 0 without any.
    pub(crate) fn ggml_tile_elements(&self) -> usize {
        let largest = self.matrices().filter(|m| matches!(m.format(), super::launch::WeightFormat::Ggml(_))).map(|m| m.rows * m.cols).max();
        largest.map_or(0, |e| e.min(super::gemm::GGML_TILE_ELEMENTS))
    }

    /// Device bytes of the embedding, the dense projections and the head, per weight format (in
    /// the order formats first appear): what `--keep-quantized` or `--quantization` saves.
    pub fn bytes_by_format(&self) -> Vec<(super::launch::WeightFormat, usize)> {
        let mut out: Vec<(super::launch::WeightFormat, usize)> = Vec::new();
        for m in self.matrices() {
            match out.iter_mut().find(|(f, _)| *f == m.format()) {
                Some((_, bytes)) => *bytes += m.bytes(),
                None => out.push((m.format(), m.bytes())),
            }
        }
        out
    }

    /// The embedding, every dense layer's projections and the untied head (not MoE experts).
    fn matrices(&self) -> impl Iterator<Item = &GpuMatrix> {
        let w = &self.weights;
        let layers = w.layers.iter().flat_map(|l| {
            let mlp: Vec<&GpuMatrix> = match &l.mlp {
                crate::model::weights::Mlp::Dense { gate_up, down } => vec![gate_up, down],
                crate::model::weights::Mlp::Moe(_) => vec![],
            };
            [&l.qkv, &l.o_proj].into_iter().chain(mlp)
        });
        layers.chain([&w.embed_tokens]).chain(w.lm_head.as_ref())
    }

    /// Bytes of weights read by one forward pass (bf16 matrices, f32 norms).
    pub fn weight_bytes(&self) -> usize {
        let c = &self.config;
        // Only the experts a token is routed to are read (the same as every weight when dense).
        let matrices = c.num_active_parameters() - c.hidden_size * (2 * c.num_hidden_layers + 1);
        // Quantized matrices (FP8, GGUF blocks) read fewer bytes than their bf16 count.
        let saved: usize = self.matrices().map(|m| (m.rows * m.cols * 2).saturating_sub(m.bytes())).sum();
        matrices * 2 + c.hidden_size * (2 * c.num_hidden_layers + 1) * 4 - saved
    }
}

/// Why the forward cannot take `batch`, if it cannot: checked before anything is launched (and,
/// with tensor parallelism, before any rank is asked).
pub(crate) fn check_batch(config: &ModelConfig, batch: &ForwardBatch) -> Result<(), CudaError> {
    // A fed token's placeholder is replaced on the device before the forward reads it.
    let fed = batch.fed_tokens();
    match batch.token_ids.iter().zip(&fed).find(|&(&t, &fed)| t as usize >= config.vocab_size && !fed).map(|(t, _)| t) {
        Some(&bad) => Err(CudaError::Config(format!("token id {bad} is outside the vocabulary of {}", config.vocab_size))),
        None => Ok(()),
    }
}

/// What the CUDA forward cannot run, if anything (refused at load, by name).
fn unsupported_feature(config: &ModelConfig) -> Option<String> {
    let c = config;
    if c.attn_logit_softcapping.is_some() {
        return Some("attention soft-capping".into());
    }
    if !super::DECODE_HEAD_DIMS.contains(&c.head_dim) {
        return Some(format!("head_dim {} (the CUDA attention kernels take {:?})", c.head_dim, super::DECODE_HEAD_DIMS));
    }
    if c.gqa_group_size() > MAX_GQA_GROUP {
        return Some(format!("a GQA group of {} (the CUDA kernels take up to {MAX_GQA_GROUP})", c.gqa_group_size()));
    }
    if let Some(moe) = &c.moe {
        if moe.num_experts > forward::MOE_MAX_EXPERTS || moe.top_k > forward::MOE_MAX_TOP_K {
            return Some(format!("{} experts, top-{}", moe.num_experts, moe.top_k));
        }
        if !moe.expert_intermediate_size.is_multiple_of(8) || !c.hidden_size.is_multiple_of(8) {
            return Some("experts whose widths are not multiples of 8".into());
        }
    }
    None
}

fn check_supported(config: &ModelConfig) -> Result<(), CudaError> {
    match unsupported_feature(config) {
        None => Ok(()),
        Some(feature) => Err(CudaError::Config(format!(
            "{} with {feature} is not supported on the GPU; use --device cpu",
            config.architecture
        ))),
    }
}

pub struct GpuBackend {
    model: GpuModel,
    /// Holds one block more than the engine sees: the last is the trash block that idle rows of
    /// padded CUDA-graph batches write to.
    cache: GpuKvCache,
    /// The layout the engine allocates from (without the trash block).
    visible_layout: KvCacheLayout,
    /// The activation arena's slots a forward of this model needs (`forward::plan`).
    arena: ArenaPlan,
    /// Launches left out of every forward (`omit_for_timing`); `Omit::Nothing` but in `bench gpu`.
    omit: Omit,
    scratch: Scratch,
    pub(crate) graphs: Option<super::graphs::DecodeGraphs>,
    sampling: super::sampling::SamplingBuffers,
    /// Batches of at most `GEMV_MAX_ROWS` tokens run through the fused GEMV path (see
    /// `cuda::forward`); off, every product goes to cuBLAS (for checks and benchmarks).
    gemv_enabled: bool,
    /// Times each launch group while installed (`bench gpu`'s breakdown; never during capture).
    pub(crate) profiler: std::cell::RefCell<Option<super::profile::StepProfiler>>,
    /// Times one serving step in `TIME_EVERY` on the device (see `profile::ServingStepTimer`).
    step_timer: super::profile::ServingStepTimer,
    /// The last step's phases: host wall times (constraint masks, packing, unpacking) and, on a
    /// timed step, device times.
    step_phases: Vec<(&'static str, std::time::Duration)>,
    /// Launched steps not yet collected, oldest first: each one's `step_timer` number. Each
    /// collect waits for its whole step (`collect_sampling`), so at most two are enqueued and the
    /// page-locked staging a launch wrote (alternate forwards) is free again two launches on.
    launched: std::collections::VecDeque<u64>,
    /// The fed tokens of the batch being launched: the previous launch's sampling output and the
    /// (token index, output word) pairs, applied right after the batch's upload (`apply_feed`).
    pending_feed: Option<(CUdeviceptr, Vec<u32>)>,
    /// Device copy of the fed pairs.
    feed_pairs: Option<CudaSlice<u32>>,
    /// Page-locked staging of each forward's uploads: the batch's arrays, the fed pairs.
    pub(crate) batch_staging: PinnedStaging,
    feed_staging: PinnedStaging,
    /// Forwards enqueued so far: their parity picks the staging buffers.
    pub(crate) forwards: usize,
}

impl GpuBackend {
    /// A bfloat16 cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: GpuModel, num_blocks: usize, block_size: usize) -> Result<Self, CudaError> {
        Self::with_kv_cache(model, num_blocks, block_size, KvCacheDtype::Auto)
    }

    /// A cache whose values are `dtype` (FP8 needs sm_89 or newer: the E4M3 conversions).
    pub fn with_kv_cache(model: GpuModel, num_blocks: usize, block_size: usize, dtype: KvCacheDtype) -> Result<Self, CudaError> {
        let c = model.config();
        let visible_layout = KvCacheLayout {
            num_layers: c.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        check_supported(c)?;
        if !model.dev.attention_fits(c.head_dim, dtype) {
            return Err(CudaError::Unavailable(format!(
                "head_dim {} attention over a {} cache needs {} bytes of shared memory a block; {} ({}) allows {}",
                c.head_dim,
                dtype.name(),
                super::launch::attention_shared_bytes(c.head_dim, dtype),
                model.dev.name,
                model.dev.arch,
                model.dev.max_shared_optin
            )));
        }
        let arena = forward::plan(&model)?;
        let cache = GpuKvCache::new(&model.dev, KvCacheLayout { num_blocks: num_blocks + 1, ..visible_layout }, dtype)?;
        let scratch = Scratch::new(&arena, model.fp8_width(), model.ggml_tile_elements(), model.gathered_logits_width());
        Ok(GpuBackend {
            model,
            cache,
            visible_layout,
            scratch,
            arena,
            omit: Omit::Nothing,
            graphs: None,
            sampling: Default::default(),
            gemv_enabled: true,
            profiler: Default::default(),
            step_timer: Default::default(),
            launched: Default::default(),
            pending_feed: None,
            feed_pairs: None,
            batch_staging: Default::default(),
            feed_staging: Default::default(),
            forwards: 0,
            step_phases: Vec::new(),
        })
    }

    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    pub fn cache(&self) -> &GpuKvCache {
        &self.cache
    }

    /// Turns the fused GEMV path of small batches on or off; graphs captured before keep the
    /// path they were captured with.
    pub fn set_gemv_enabled(&mut self, enabled: bool) {
        self.gemv_enabled = enabled;
    }

    /// Leaves `omit`'s launches out of every forward from now on (`Omit::Nothing` puts them back),
    /// to time a step without them (`bench gpu`): the forward's results are then wrong. Graphs
    /// captured before keep what they were captured with.
    pub fn omit_for_timing(&mut self, omit: Omit) {
        self.omit = omit;
    }

    /// Installs a fresh profiler (`Some`) or takes the installed one out (`None`), returning it.
    pub fn swap_profiler(&self, profiler: Option<super::profile::StepProfiler>) -> Option<super::profile::StepProfiler> {
        self.profiler.replace(profiler)
    }

    /// The block no sequence is ever given (see `cache`).
    pub(crate) fn trash_block(&self) -> u32 {
        self.visible_layout.num_blocks as u32
    }

    fn ensure_scratch(&mut self, tokens: usize, rows: usize, partials: usize) -> Result<(), CudaError> {
        let dev = self.model.dev.clone();
        self.scratch.ensure(&dev, &self.model.config, tokens, rows, partials)
    }

    /// Checks the batch, sizes the buffers, uploads the indices and enqueues the forward; the
    /// logits of the requested rows end up in `scratch.logits`. Returns the number of rows.
    fn enqueue(&mut self, batch: &ForwardBatch) -> Result<usize, CudaError> {
        check_batch(&self.model.config, batch)?;
        let c = &self.model.config;
        let (n, rows) = (batch.num_tokens(), batch.logits_rows.len());
        let plan = plan_attention(batch, AttentionPath::Mixed);
        // Split-K serves the decode rows only; partials are indexed by token row, so they are
        // sized for the whole batch.
        let split = AttentionSplit::plan(
            c.attention_span(plan.decode_context),
            plan.num_decode(n) * c.num_key_value_heads,
            self.model.dev.decode_slots(c.head_dim),
        );
        let partials = if split.splits > 1 { n * c.num_attention_heads * split.splits } else { 0 };
        self.ensure_scratch(n, rows, partials)?;
        let arrays = upload_batch(&self.model.dev, &mut self.scratch, batch, &plan, &mut self.batch_staging, self.forwards)?;
        self.apply_feed(arrays.tokens)?;
        self.run_forward(&self.scratch, n, rows, &arrays, split)?;
        Ok(rows)
    }

    /// Runs the batch and returns the logits of its requested rows, `[rows, vocab]`, on the host.
    pub fn forward_logits(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, CudaError> {
        let rows = self.enqueue(batch)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let vocab = self.model.config.vocab_size;
        let logits = self.scratch.logits.as_ref().expect("sized by enqueue");
        let mut host = vec![0.0f32; rows * vocab];
        self.model.dev.stream.memcpy_dtoh(&logits.slice(..rows * vocab), &mut host)?;
        Ok(host)
    }

    /// Runs the batch and returns the greedy token of each requested row; only those integers
    /// cross to the host.
    pub fn forward_argmax(&mut self, batch: &ForwardBatch) -> Result<Vec<u32>, CudaError> {
        let rows = self.enqueue(batch)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let dev = self.model.dev.clone();
        let tokens = dev.stream.alloc_zeros::<u32>(rows)?;
        self.launch_argmax(ptr(&dev, self.scratch.logits.as_ref().expect("sized by enqueue")), &tokens, rows)?;
        Ok(dev.stream.clone_dtoh(&tokens)?)
    }

    /// Enqueues the whole forward for `n` tokens and `rows` logits rows on the stream, with the
    /// buffers of `scratch` (no host synchronisation, no allocation: it can be captured in a
    /// graph). Batches of at most `GEMV_MAX_ROWS` tokens fuse norms and activations into the
    /// GEMV while it is on (see `cuda::forward`).
    pub(crate) fn run_forward(&self, scratch: &Scratch, n: usize, rows: usize, arrays: &BatchArrays, split: AttentionSplit) -> Result<(), CudaError> {
        let launch = Launch { scratch, cache: &self.cache, arrays, split, profiler: &self.profiler, omit: self.omit };
        forward::enqueue(&self.model, launch, n, rows, self.gemv_enabled)
    }

    /// A fresh arena for this model (a graph's own buffers).
    pub(crate) fn new_scratch(&self) -> Scratch {
        Scratch::new(&self.arena, self.model.fp8_width(), self.model.ggml_tile_elements(), self.model.gathered_logits_width())
    }
}

impl ModelBackend for GpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        &self.visible_layout
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        self.cache.copy_blocks(&self.model.dev, copies);
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        self.forward_logits(batch).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        self.forward_and_sample(batch, rows).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))
    }

    fn pipelined(&self) -> bool {
        true
    }

    fn launch(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<(), ModelError> {
        self.launch_step(batch, rows).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))
    }

    fn collect(&mut self, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        self.collect_step(rows).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))
    }

    fn step_phases(&self) -> &[(&'static str, std::time::Duration)] {
        &self.step_phases
    }
}

impl GpuBackend {
    /// Runs the forward (through a decode graph when one fits) and samples every row on the
    /// device; only the results cross to the host. Constrained samples' masks are computed on
    /// the host while the forward runs (it is only enqueued) and go up as bitmasks beside the
    /// sampling parameters.
    pub fn forward_and_sample(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, CudaError> {
        self.launch_step(batch, rows)?;
        self.collect_step(rows)
    }

    /// Enqueues the forward and the sampling of `rows`, its fed tokens taken on the device from
    /// the previous launch's samples, and returns without waiting (`collect_step` takes the
    /// results).
    pub fn launch_step(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<(), CudaError> {
        use super::profile::StepMark;
        let dev = self.model.dev.clone();
        self.pending_feed = None;
        if !batch.fed.is_empty() {
            self.pending_feed = Some(self.sampling.fed_source(&dev, &batch.fed)?);
        }
        let step = self.step_timer.begin(&dev)?;
        let (logits, num_rows) = self.forward_on_device(batch)?;
        if self.pending_feed.take().is_some() {
            return Err(CudaError::Config("the batch's fed tokens were not applied".into()));
        }
        self.step_timer.mark(&dev, StepMark::ForwardEnd)?;
        // A fed row's sampler has not observed the token it was fed yet.
        let fed = batch.fed_tokens();
        let unobserved: Vec<bool> = rows.iter().map(|r| batch.logits_rows.get(r.row).is_some_and(|&t| fed[t])).collect();
        let vocab = self.model.config.vocab_size;
        launch_sampling(&dev, &mut self.sampling, logits, num_rows, vocab, rows, &unobserved, Some(&self.step_timer))?;
        self.launched.push_back(step);
        Ok(())
    }

    /// Waits for the oldest launched step and returns its results (`rows`: its samplers, in the
    /// launch's order).
    pub fn collect_step(&mut self, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, CudaError> {
        self.step_phases.clear();
        let step = self.launched.pop_front().ok_or_else(|| CudaError::Config("collect without a launched step".into()))?;
        let (results, times) = collect_sampling(&mut self.sampling, rows)?;
        if !times.masks.is_zero() {
            self.step_phases.push(("constraint_masks", times.masks));
        }
        self.step_phases.extend([("sample_pack", times.pack), ("sample_unpack", times.unpack)]);
        self.step_phases.extend(self.step_timer.phases(step)?);
        Ok(results)
    }

    /// Puts the pending fed tokens (see `pending_feed`) into the uploaded batch's token ids at
    /// `tokens`, on the stream after the upload and before the forward.
    pub(crate) fn apply_feed(&mut self, tokens: CUdeviceptr) -> Result<(), CudaError> {
        let Some((sampled, pairs)) = self.pending_feed.take() else { return Ok(()) };
        let dev = &self.model.dev;
        if self.feed_pairs.as_ref().is_none_or(|b| b.len() < pairs.len()) {
            self.feed_pairs = Some(dev.stream.alloc_zeros::<u32>(pairs.len().next_power_of_two())?);
        }
        let buffer = self.feed_pairs.as_mut().unwrap();
        self.feed_staging.upload(dev, self.forwards, &pairs, ptr(dev, buffer))?;
        let n = pairs.len() / 2;
        let config = cudarc::driver::LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `tokens` holds the batch's token ids, `sampled` the previous launch's output
        // (its set is not written again before this launch's sampling), and every pair indexes
        // inside them (`SamplingBuffers::fed_source`).
        let vocab = self.model.config.vocab_size as i32;
        unsafe { super::launchers::feed_tokens(dev, config, tokens, sampled, ptr(dev, buffer), n as i32, vocab)? };
        Ok(())
    }

    /// Runs the forward and leaves the logits of the batch's requested rows on the device:
    /// through its bucket's captured graph when the batch is decode-only and fits one (and graphs
    /// are on), else kernel by kernel. Returns the logits pointer and the number of real rows
    /// (a graph's padding rows come after them and are never read).
    pub(crate) fn forward_on_device(&mut self, batch: &ForwardBatch) -> Result<(CUdeviceptr, usize), CudaError> {
        self.forwards += 1;
        if let Some(replayed) = self.replay_decode_graph(batch) {
            return replayed;
        }
        let rows = self.enqueue(batch)?;
        let logits = self.scratch.logits.as_ref().map_or(0, |l| ptr(&self.model.dev, l));
        Ok((logits, rows))
    }

    /// Like `forward_on_device`, then copies the logits to the host (today's serving path before
    /// device sampling; `bench gpu` compares the two).
    pub fn forward_logits_via_graphs(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, CudaError> {
        let (logits, rows) = self.forward_on_device(batch)?;
        let vocab = self.model.config.vocab_size;
        let mut host = vec![0.0f32; rows * vocab];
        if rows > 0 {
            // SAFETY: `logits` points at `rows * vocab` floats of a live buffer on this stream.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, logits, self.model.dev.stream.cu_stream())?;
            }
            self.model.dev.stream.synchronize()?;
        }
        Ok(host)
    }
}
