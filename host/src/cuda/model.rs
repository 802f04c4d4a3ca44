//! The GPU forward of the Llama family in bfloat16 (float32 residual stream and accumulation),
//! with the CPU path's batch contract: a `ForwardBatch` mixing prefill chunks and decode tokens,
//! keys and values written through the slot mapping into a paged cache
//! `[num_blocks, num_kv_heads, block_size, head_dim]` per layer, logits for the requested rows.
//!
//! All work goes to one stream; every launch takes raw device pointers. The pieces live beside
//! this file: the weights (`weights`), the paged cache (`kv_cache`), the per-batch buffers and
//! index upload (`batch`), attention launches (`attention`) and decode graphs (`graphs`).

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};
use half::bf16;

use super::gemm::{cublas_linear, linear, OutType};
use super::gemv::{gemv, Gemv, GemvInput};
use super::launch::{gemv_supports, plan_attention, row_threads, AttentionPath, AttentionSplit, MAX_GQA_GROUP};
use super::attention::{launch_attention, AttentionArgs};
use super::launchers;
use super::batch::{upload_batch, BatchArrays, Scratch};
use super::kv_cache::GpuKvCache;
use super::{CudaError, GpuDevice};
use crate::kv_cache::{BlockId, KvCacheLayout};
use crate::model::cpu::CpuModel;
use crate::model::rope::Rope;
use super::weights::{GpuMatrix, GpuStore, GpuWeights};
use crate::model::cpu::CpuMatrix;
use crate::model::sources::DummySource;
use crate::model::weights::{LayerWeights, Loader, Mlp, ModelWeights, WeightSource, WeightStore};
use crate::model::config::Activation;
use crate::model::{ModelConfig, ModelError, RopeScaling};
use super::sampling::sample_on_device;
use crate::runner::{ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, SampledRow};

pub struct GpuModel {
    dev: Arc<GpuDevice>,
    config: ModelConfig,
    weights: ModelWeights<GpuWeights>,
    inv_freq: CudaSlice<f32>,
    position_scale: f32,
}

/// A dense layer's gate/up and down matrices (`check_supported` refuses experts).
fn dense(layer: &LayerWeights<GpuWeights>) -> (&GpuMatrix, &GpuMatrix) {
    match &layer.mlp {
        Mlp::Dense { gate_up, down } => (gate_up, down),
        Mlp::Moe(_) => unreachable!("mixtures of experts are refused at load"),
    }
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
                data: upload_bf16(&dev, &m.data)?,
                bias: m.bias.as_ref().map(|b| dev.stream.clone_htod(b)).transpose()?,
            })
        };
        let vector = |v: &Vec<f32>| -> Result<CudaSlice<f32>, CudaError> { Ok(dev.stream.clone_htod(v)?) };
        let weights = cpu.weights().try_map::<GpuWeights, CudaError>(&matrix, &vector)?;
        Self::with_weights(dev, config, weights)
    }

    /// Every weight of `config`'s architecture from `source`, straight to the device (see
    /// `cuda::weights`): no host copy of the model is made.
    pub fn load(dev: Arc<GpuDevice>, config: ModelConfig, source: &dyn WeightSource) -> Result<Self, CudaError> {
        config.validate().map_err(|e| CudaError::Config(e.to_string()))?;
        check_supported(&config)?;
        let started = std::time::Instant::now();
        let mut store = GpuStore::new(dev.clone());
        let total = config.num_parameters() as u64 * GpuStore::BYTES_PER_ELEMENT;
        let weights = config
            .architecture
            .load(&config, &mut Loader::new(source, &mut store).with_progress(total))
            .map_err(|e| CudaError::Config(e.to_string()))?;
        dev.stream.synchronize()?;
        tracing::info!(
            gib = format!("{:.2}", store.bytes() as f64 / (1u64 << 30) as f64),
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            dummy = source.is_dummy(),
            "weights on the GPU"
        );
        Self::with_weights(dev, config, weights)
    }

    /// Deterministic random weights made on the device (`--load-format dummy`): matrices uniform
    /// with standard deviation 0.02, norms ones, biases zeros.
    pub fn dummy(dev: Arc<GpuDevice>, config: ModelConfig, seed: u64) -> Result<Self, CudaError> {
        Self::load(dev, config, &DummySource::new(seed))
    }

    fn with_weights(dev: Arc<GpuDevice>, config: ModelConfig, weights: ModelWeights<GpuWeights>) -> Result<Self, CudaError> {
        let (inv_freq, position_scale) = rope_tables(&config);
        Ok(GpuModel { inv_freq: dev.stream.clone_htod(&inv_freq)?, position_scale, weights, config, dev })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    /// Bytes of weights read by one forward pass (bf16 matrices, f32 norms).
    pub fn weight_bytes(&self) -> usize {
        let c = &self.config;
        // Only the experts a token is routed to are read (the same as every weight when dense).
        let matrices = c.num_active_parameters() - c.hidden_size * (2 * c.num_hidden_layers + 1);
        matrices * 2 + c.hidden_size * (2 * c.num_hidden_layers + 1) * 4
    }
}

/// What the CUDA forward cannot run yet, if anything: it runs the Llama decoder with Q/K/V biases,
/// a sliding window on every layer (Mistral, Phi-3) and any attention scale; other features are
/// refused by name until it runs the shared decoder of `model::arch`.
fn unsupported_feature(config: &ModelConfig) -> Option<&'static str> {
    let c = config;
    let unsupported = [
        (c.norm_unit_offset, "(1 + w) norms"),
        (c.qk_norm, "q/k norms"),
        (c.sandwich_norms, "post-attention/feed-forward norms"),
        (c.embedding_multiplier.is_some(), "embedding scaling"),
        (c.hidden_act != Activation::Silu, "GELU"),
        (c.sliding_window.is_some() && c.all_layers_sliding().is_none(), "sliding windows on some layers only"),
        (c.attn_logit_softcapping.is_some() || c.final_logit_softcapping.is_some(), "soft-capping"),
        (c.moe.is_some(), "mixture of experts"),
        (c.rotary_dim != c.head_dim, "partial rotary"),
        (c.rope_local_theta.is_some(), "local RoPE"),
        (matches!(c.rope_scaling, Some(RopeScaling::Yarn { .. })), "YaRN"),
    ];
    unsupported.into_iter().find_map(|(present, what)| present.then_some(what))
}

fn check_supported(config: &ModelConfig) -> Result<(), CudaError> {
    match unsupported_feature(config) {
        None => Ok(()),
        Some(feature) => Err(CudaError::Config(format!(
            "{} with {feature} is not supported on the GPU yet; use --device cpu",
            config.architecture
        ))),
    }
}

fn rope_tables(config: &ModelConfig) -> (Vec<f32>, f32) {
    let rope = Rope::tables(config).swap_remove(0);
    (rope.inv_freq().to_vec(), rope.position_scale())
}

pub struct GpuBackend {
    model: GpuModel,
    /// Holds one block more than the engine sees: the last is the trash block that idle rows of
    /// padded CUDA-graph batches write to.
    cache: GpuKvCache,
    /// The layout the engine allocates from (without the trash block).
    visible_layout: KvCacheLayout,
    scratch: Scratch,
    pub(crate) graphs: Option<super::graphs::DecodeGraphs>,
    sampling: super::sampling::SamplingBuffers,
    /// Batches of at most `GEMV_MAX_ROWS` tokens run through the fused GEMV path (see
    /// `run_layers`); off, every product goes to cuBLAS (for checks and benchmarks).
    gemv_enabled: bool,
    /// Times each launch group while installed (`bench gpu`'s breakdown; never during capture).
    pub(crate) profiler: std::cell::RefCell<Option<super::profile::StepProfiler>>,
}

impl GpuBackend {
    pub fn new(model: GpuModel, num_blocks: usize, block_size: usize) -> Result<Self, CudaError> {
        let c = model.config();
        let visible_layout = KvCacheLayout {
            num_layers: c.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        if !super::DECODE_HEAD_DIMS.contains(&c.head_dim) {
            return Err(CudaError::Config(format!("head_dim {} (the CUDA kernels support 64 and 128)", c.head_dim)));
        }
        if c.gqa_group_size() > MAX_GQA_GROUP {
            return Err(CudaError::Config(format!(
                "GQA group of {} (the CUDA kernels support up to {MAX_GQA_GROUP})",
                c.gqa_group_size()
            )));
        }
        let cache = GpuKvCache::new(&model.dev, KvCacheLayout { num_blocks: num_blocks + 1, ..visible_layout })?;
        Ok(GpuBackend {
            model,
            cache,
            visible_layout,
            scratch: Scratch::default(),
            graphs: None,
            sampling: Default::default(),
            gemv_enabled: true,
            profiler: Default::default(),
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
        let c = &self.model.config;
        if let Some(&bad) = batch.token_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(CudaError::Config(format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
        }
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
        let arrays = upload_batch(&self.model.dev, &mut self.scratch, batch, &plan)?;
        self.run_layers(&self.scratch, n, rows, &arrays, split)?;
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
    /// buffers of `s` (no host synchronisation, no allocation: it can be captured in a graph).
    ///
    /// Batches of at most `GEMV_MAX_ROWS` tokens (decode at batch 1–8) take the fused GEMV path:
    /// per layer `gemv(add+norm → qkv)`, rope, attention, `gemv(o_proj)`, `gemv(add+norm →
    /// gate_up)`, `gemv(silu·mul → down)`, and one `gemv(add+norm → lm_head)` for the logits:
    /// 6 launches a layer instead of 9, the final norm and the lm_head one instead of three.
    /// Each add+norm GEMV reads the residual from one buffer and (block 0 only) writes the
    /// updated residual to the other, so no block reads what another is writing; the roles swap
    /// after every such launch (`x` → `x2` → `x` ...). Stream order (and a graph's node order)
    /// puts each launch after the previous one has finished, so the buffer written by one launch
    /// is complete before the next reads it, and the buffer it read is free to be overwritten by
    /// the launch after. The delta each adds (`proj`, the last o_proj or down output) is only
    /// ever written by the launch before it.
    pub(crate) fn run_layers(&self, s: &Scratch, n: usize, rows: usize, a: &BatchArrays, split: AttentionSplit) -> Result<(), CudaError> {
        let dev = self.model.dev.clone();
        let m = &self.model;
        let c = &m.config;
        let (h, q_size, kv_size, inter) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let qkv_size = q_size + 2 * kv_size;
        let x = ptr(&dev, s.x.as_ref().unwrap());
        let hn = ptr(&dev, s.h.as_ref().unwrap());
        let qkv = ptr(&dev, s.qkv.as_ref().unwrap());
        let attn = ptr(&dev, s.attn.as_ref().unwrap());
        let proj = ptr(&dev, s.proj.as_ref().unwrap());
        let gate_up = ptr(&dev, s.gate_up.as_ref().unwrap());
        let act = ptr(&dev, s.act.as_ref().unwrap());
        let null: CUdeviceptr = 0;
        let (part_out, part_max, part_sum) = if split.splits > 1 {
            (
                ptr(&dev, s.part_out.as_ref().unwrap()),
                ptr(&dev, s.part_max.as_ref().unwrap()),
                ptr(&dev, s.part_sum.as_ref().unwrap()),
            )
        } else {
            (null, null, null)
        };
        let rows_cfg = |width: usize| LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (row_threads(width), 1, 1),
            shared_mem_bytes: 0,
        };
        let (hidden_i, inter_i, eps) = (h as i32, inter as i32, c.rms_norm_eps);
        let layout = *self.cache.layout();
        let (num_heads, num_kv_heads, head_dim) = (c.num_attention_heads as i32, c.num_key_value_heads as i32, c.head_dim as i32);
        let block_size = layout.block_size as i32;
        let interleaved = 0i32;
        let lm_head = m.weights.lm_head().ptr(&dev);
        let mark = |kind: &'static str| -> Result<(), CudaError> {
            match self.profiler.borrow_mut().as_mut() {
                Some(profiler) => profiler.mark(&dev, kind),
                None => Ok(()),
            }
        };
        let small = self.gemv_enabled && rows <= n && [h, q_size, inter].iter().all(|&k| gemv_supports(n, k));
        // Products outside the fused path: `linear` picks the GEMV or cuBLAS by shape; with the
        // GEMV off, cuBLAS takes them all.
        let product = |out: CUdeviceptr, out_type: OutType, input: CUdeviceptr, w: CUdeviceptr, rows: usize, k: usize, n: usize| unsafe {
            if self.gemv_enabled {
                linear(&dev, out, out_type, input, w, rows, k, n)
            } else {
                cublas_linear(&dev, out, out_type, input, w, rows, k, n)
            }
        };
        // The fused path's products; `input` says what the staging computes.
        let fused = |out: CUdeviceptr, out_type: OutType, input: GemvInput, w: CUdeviceptr, bias: CUdeviceptr, rows: usize, k: usize, n: usize| unsafe {
            gemv(&dev, &Gemv { out, out_type, input, w, bias, m: rows, k, n })
        };
        let add_norm_input = |residual: CUdeviceptr, delta: CUdeviceptr, weight: &CudaSlice<f32>, residual_out: CUdeviceptr, rows: CUdeviceptr| {
            GemvInput::AddNorm { residual, delta, weight: ptr(&dev, weight), residual_out, rows, eps }
        };
        // residual += delta (unless null); out = rmsnorm(residual) * weight (unless null).
        let add_norm = |delta: CUdeviceptr, weight: &CudaSlice<f32>, out: CUdeviceptr| -> Result<(), CudaError> {
            mark("add_rmsnorm")?;
            // SAFETY: the residual, delta and output hold `n` rows of `h`; the weight `h`.
            unsafe { launchers::fused_add_rmsnorm(&dev, rows_cfg(h), x, delta, ptr(&dev, weight), out, hidden_i, eps)? };
            Ok(())
        };
        // RoPE, the cache write and attention of layer `i` (the same on both paths).
        let rope_attention = |i: usize| -> Result<(), CudaError> {
            let (k_cache, v_cache) = self.cache.layer_ptrs(&dev, i);
            let attention = c.layer_attention(i);
            mark("rope_and_cache")?;
            // SAFETY: `qkv` holds `n` rows; positions and slots `n` entries inside the cache.
            unsafe {
                launchers::rope_and_cache(
                    &dev,
                    rows_cfg((c.num_attention_heads + c.num_key_value_heads) * c.head_dim / 2),
                    qkv,
                    a.positions,
                    a.slots,
                    ptr(&dev, &m.inv_freq),
                    k_cache,
                    v_cache,
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    block_size,
                    m.position_scale,
                    interleaved,
                )?;
            }
            mark("attention")?;
            launch_attention(
                &dev,
                &AttentionArgs {
                    out: attn,
                    q: qkv,
                    q_stride: qkv_size,
                    k_cache,
                    v_cache,
                    block_tables: a.block_tables,
                    token_seq: a.token_seq,
                    positions: a.positions,
                    max_blocks: a.max_blocks,
                    tiles: a.tiles,
                    num_tiles: a.num_tiles,
                    decode_rows: a.decode_rows,
                    num_decode: a.num_decode,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    block_size: layout.block_size,
                    window: attention.window.unwrap_or(0),
                    scale: attention.scale,
                    split,
                    partials: (part_out, part_max, part_sum),
                },
            )
        };

        mark("embedding")?;
        // SAFETY: `x` holds `n` rows of `h`; every token id was checked against the vocabulary.
        unsafe { launchers::embedding_gather(&dev, rows_cfg(h), x, m.weights.embed_tokens.ptr(&dev), a.tokens, hidden_i)? };
        if small {
            // The residual is in `residual`; each add+norm GEMV writes the sum to `spare`.
            let (mut residual, mut spare) = (x, ptr(&dev, s.x2.as_ref().unwrap()));
            for (i, layer) in m.weights.layers.iter().enumerate() {
                let delta = if i == 0 { null } else { proj };
                let bias = layer.qkv.bias.as_ref().map_or(null, |b| ptr(&dev, b));
                mark("gemv qkv +add+norm")?;
                let input = add_norm_input(residual, delta, &layer.attn_norm, spare, null);
                fused(qkv, OutType::Bf16, input, layer.qkv.ptr(&dev), bias, n, h, qkv_size)?;
                std::mem::swap(&mut residual, &mut spare);
                rope_attention(i)?;
                mark("gemv o_proj")?;
                fused(proj, OutType::Bf16, GemvInput::Plain(attn), layer.o_proj.ptr(&dev), null, n, q_size, h)?;
                mark("gemv gate_up +add+norm")?;
                let input = add_norm_input(residual, proj, &layer.ffn_norm, spare, null);
                fused(gate_up, OutType::Bf16, input, dense(layer).0.ptr(&dev), null, n, h, 2 * inter)?;
                std::mem::swap(&mut residual, &mut spare);
                mark("gemv down +silu")?;
                fused(proj, OutType::Bf16, GemvInput::SiluMul(gate_up), dense(layer).1.ptr(&dev), null, n, inter, h)?;
            }
            if rows > 0 {
                // The last MLP output joins the residual inside the lm_head GEMV, for the wanted
                // rows only; nothing reads the residual after, so it is not written back.
                let logits = ptr(&dev, s.logits.as_ref().unwrap());
                mark("gemv lm_head +add+norm")?;
                let input = add_norm_input(residual, proj, &m.weights.final_norm, null, a.rows);
                fused(logits, OutType::F32, input, lm_head, null, rows, h, c.vocab_size)?;
            }
            return mark("end");
        }
        for (i, layer) in m.weights.layers.iter().enumerate() {
            // The previous layer's MLP output joins the residual stream here.
            let delta = if i == 0 { null } else { proj };
            add_norm(delta, &layer.attn_norm, hn)?;
            mark("gemm qkv")?;
            product(qkv, OutType::Bf16, hn, layer.qkv.ptr(&dev), n, h, qkv_size)?;
            if let Some(bias) = &layer.qkv.bias {
                let cols = qkv_size as i32;
                mark("add_bias")?;
                // SAFETY: `qkv` holds `n` rows of `qkv_size`, the bias `qkv_size`.
                unsafe { launchers::add_bias(&dev, rows_cfg(qkv_size), qkv, ptr(&dev, bias), cols)? };
            }
            rope_attention(i)?;
            mark("gemm o_proj")?;
            product(proj, OutType::Bf16, attn, layer.o_proj.ptr(&dev), n, q_size, h)?;
            add_norm(proj, &layer.ffn_norm, hn)?;
            mark("gemm gate_up")?;
            product(gate_up, OutType::Bf16, hn, dense(layer).0.ptr(&dev), n, h, 2 * inter)?;
            mark("silu_and_mul")?;
            // SAFETY: `gate_up` holds `n` rows of `2 * inter`, `act` `n` rows of `inter`.
            unsafe { launchers::silu_and_mul(&dev, rows_cfg(inter), act, gate_up, inter_i)? };
            mark("gemm down")?;
            product(proj, OutType::Bf16, act, dense(layer).1.ptr(&dev), n, inter, h)?;
        }
        // The last MLP output joins the residual; only the wanted rows are normalised.
        add_norm(proj, &m.weights.final_norm, null)?;
        if rows > 0 {
            let final_h = ptr(&dev, s.final_h.as_ref().unwrap());
            mark("rmsnorm_rows")?;
            let config = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(h), 1, 1), shared_mem_bytes: 0 };
            // SAFETY: `a.rows` holds `rows` indices of rows of `x`; `final_h` holds `rows` rows.
            unsafe { launchers::rmsnorm_rows(&dev, config, x, a.rows, ptr(&dev, &m.weights.final_norm), final_h, hidden_i, eps)? };
            let logits = ptr(&dev, s.logits.as_ref().unwrap());
            mark("gemm lm_head")?;
            product(logits, OutType::F32, final_h, lm_head, rows, h, c.vocab_size)?;
        }
        mark("end")
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
}

impl GpuBackend {
    /// Runs the forward (through a decode graph when one fits) and samples every row on the
    /// device; only the results cross to the host.
    pub fn forward_and_sample(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, CudaError> {
        let (logits, num_rows) = self.forward_on_device(batch)?;
        let dev = self.model.dev.clone();
        let vocab = self.model.config.vocab_size;
        sample_on_device(&dev, &mut self.sampling, logits, num_rows, vocab, rows)
    }

    /// Runs the forward and leaves the logits of the batch's requested rows on the device:
    /// through its bucket's captured graph when the batch is decode-only and fits one (and graphs
    /// are on), else kernel by kernel. Returns the logits pointer and the number of real rows
    /// (a graph's padding rows come after them and are never read).
    pub(crate) fn forward_on_device(&mut self, batch: &ForwardBatch) -> Result<(CUdeviceptr, usize), CudaError> {
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
