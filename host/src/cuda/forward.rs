//! The GPU forward: `model::ops::Ops` over CUDA, so every architecture of `model::arch` runs on
//! the device from its one definition. bfloat16 activations, a float32 residual stream and
//! float32 accumulation; every launch goes to the device's one stream and nothing is read back,
//! so a forward can be captured in a CUDA graph.
//!
//! **Activations** live in an arena of slots (`Scratch::slots`), each `bytes_per_token` wide per
//! token of capacity. An `Act` takes the first free slot of exactly its width, so a forward's
//! slots depend only on the model and the path it takes, never on the data: `plan` runs the
//! forward once without launching anything (with and without the fused path) to find the slots
//! it needs, and real forwards (and graph captures) reuse those same buffers.
//!
//! **Fusion at batch 1–8.** With the GEMV on, `add_norm` and a SiLU `gated_activation` launch
//! nothing: they leave their output *pending*, and the `linear` that consumes it folds the step
//! into the GEMV's input staging (`GemvInput::AddNorm` / `SiluMul`), the launch and the round trip
//! through memory saved. So does a split decode attention of one token: its partials' merge is
//! left pending for the o-projection's GEMV (`GemvInput::Merge`; `FusedMerge` says for which
//! formats). With the skinny kernel on (`cuda::skinny`, 2 to 64 rows), a SiLU `gated_activation`
//! stays pending for it too: it stages the activation of the down projection's input itself. A
//! fused add+norm writes the updated residual into a fresh slot (the GEMV reads the old one in
//! every block, so it cannot be updated in place) and the residual's handle moves there. A
//! pending output consumed by anything but a fusable `linear` is computed first (`resolve`), so
//! fusion never changes what an architecture can ask. Freeing an input a pending output still
//! reads is deferred until it is resolved.
//!
//! **Products left in pieces.** Outputs of products can be pending too: an FP8 GEMM's unscaled
//! output (`Pending::Fp8Scales`), and at 2-64 rows a bf16 cuBLAS product made as float32 partials
//! over slices of K (`Pending::SplitSum`, `launch::split_k_splits`). `add_norm` folds either into
//! its launch, and the decode attention that applies RoPE itself reads a split QKV product's
//! partials; any other consumer gets them finished first.
//!
//! Norm weights arrive with any (1 + w) offset already folded in (`cuda::weights`).

use std::cell::RefCell;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::attention::{launch_attention, AttentionArgs, FusedRope, SplitMerge};
use super::batch::{BatchArrays, Scratch};
use super::collective::{Elem, RankComm};
use super::fp8_gemm::{fp8_linear, fp8_linear_leaving_scales, scale_output, Fp8Product};
use super::gemm::{cublas_linear, ggml_linear, split_k_partials, OutType};
use super::gemv::{gemv, Gemv, GemvInput, GemvWeight};
use super::kv_cache::GpuKvCache;
use super::launch::{gated_config, grid_stride_config, split_k_splits, gemv_mode_rows, gemv_padded_rows, gemv_prefers, gemv_supports, GemvMode, moe_gemm_config, moe_most_tiles, moe_route_config, norm_config, row_threads, L2_PREFETCH_ROWS, AttentionSplit, WeightFormat, MOE_GROUP_CONFIG};
use super::launchers;
use super::skinny::{self, SkinnyInput};
use super::model::{ptr, GpuModel};
use super::profile::StepProfiler;
use super::weights::{GpuMatrix, GpuWeights};
use super::{CudaError, GpuDevice};
use crate::model::config::{Activation, LayerAttention, MoeConfig};
use crate::model::ops::{Act, Norm, Ops};
use crate::model::parallel::vocab_per_rank;
use crate::model::weights::MoeWeights;
use crate::model::ModelError;

/// The most experts and the largest top-k `kernels/moe.cu` takes.
pub const MOE_MAX_EXPERTS: usize = 1024;
pub const MOE_MAX_TOP_K: usize = 32;

/// What a real (not planning) forward runs with.
pub(crate) struct Launch<'a> {
    pub scratch: &'a Scratch,
    pub cache: &'a GpuKvCache,
    pub arrays: &'a BatchArrays,
    pub split: AttentionSplit,
    pub profiler: &'a RefCell<Option<StepProfiler>>,
    pub omit: Omit,
}

/// Launches a timing run leaves out (`GpuBackend::omit_for_timing`, for `bench gpu` only): a
/// decode step captured in a graph without them, against the whole step, is what they cost
/// inside the graph, their seams with their neighbours included. The step's results are wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Omit {
    #[default]
    Nothing,
    /// The attention kernels (with RoPE and the cache write fused, and the split merge; at 2 to
    /// 64 rows also the attention's L2 prefetch of the o-projection, which then starts colder).
    Attention,
    /// Every product (GEMV, cuBLAS, FP8 and GGUF paths), with what a GEMV's staging fuses, and
    /// every MoE block.
    Products,
}

/// The arena's slots a model's forward needs, bytes per token each.
pub(crate) type ArenaPlan = Vec<usize>;

/// An output left for its consumer to compute (see the module docs).
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// `residual += delta`, then `rmsnorm(residual) * weight`; `delta_scales`: the delta is an
    /// FP8 GEMM's unscaled output, and these are its scales (`Fp8Scales`, folded in);
    /// `delta_partials`: the delta is still a split product's partials (`SplitSum`, folded in).
    AddNorm {
        residual: Act,
        delta: Option<Act>,
        weight: CUdeviceptr,
        eps: f32,
        delta_scales: Option<(CUdeviceptr, CUdeviceptr)>,
        delta_partials: Option<(CUdeviceptr, usize)>,
    },
    /// `silu(gate) * up` of the `[gate | up]` rows.
    SiluMul { gate_up: Act },
    /// The decode attention's split-K partials merged (they live in the scratch, not in an
    /// activation; the next attention resolves this first, as every op but `linear` does).
    Merge(SplitMerge),
    /// An FP8 GEMM's output, written unscaled: each `[i, j]` still to be multiplied by
    /// `rows[i] * cols[j]` (`fp8_linear_leaving_scales`). `add_norm` and `gated_activation` fold
    /// that into their kernels; anything else gets `fp8_scale_output` first. The row scales live
    /// in the FP8 input scratch, so this is always resolved before the next FP8 product (every
    /// op resolves what it does not fold before it launches).
    Fp8Scales { rows: CUdeviceptr, cols: CUdeviceptr },
    /// A bf16 product made as `splits` float32 partials over slices of K (`gemm::split_k_partials`,
    /// in the scratch's `product_partials`): `add_norm` folds their sum into its kernel, and so
    /// does the decode attention that applies RoPE itself for its QKV rows; anything else gets
    /// `sum_partials_bf16` first. The scratch holds one product's partials, so this is
    /// always resolved before the next product (every op resolves what it does not fold).
    SplitSum { partials: CUdeviceptr, splits: usize },
}

/// What a product left for its consumer to finish (`Pending::Fp8Scales` or `Pending::SplitSum`).
enum Left {
    Fp8Scales(CUdeviceptr, CUdeviceptr),
    SplitPartials(CUdeviceptr, usize),
}

impl Pending {
    fn reads(&self, act: Act) -> bool {
        match *self {
            Pending::AddNorm { residual, delta, .. } => residual == act || delta == Some(act),
            Pending::SiluMul { gate_up } => gate_up == act,
            Pending::Merge(_) | Pending::Fp8Scales { .. } | Pending::SplitSum { .. } => false,
        }
    }
}

#[derive(Debug)]
struct ActState {
    /// The arena slot holding it; `None` once released.
    slot: Option<usize>,
    /// Elements per row.
    width: usize,
    f32: bool,
    pending: Option<Pending>,
    /// A pending output that a fused product consumed without computing it: reading it again is
    /// a bug, reported rather than answered with garbage.
    consumed: bool,
}

pub(crate) struct GpuOps<'a> {
    model: &'a GpuModel,
    /// `None` while planning: allocate, launch nothing.
    launch: Option<Launch<'a>>,
    n: usize,
    rows: usize,
    /// Products of at most `GEMV_MAX_ROWS` rows go through the GEMV, with fusion, and bf16 ones
    /// of the skinny kernel's rows through it (`cuda::skinny`); off, every product is cuBLAS's.
    gemv: bool,
    slot_bytes: Vec<usize>,
    busy: Vec<bool>,
    acts: Vec<ActState>,
    /// The activations with a pending computation (at most a few at once).
    pending: Vec<Act>,
    /// Freed activations a pending computation still reads.
    deferred: Vec<Act>,
    /// A decode-only batch's `rope_and_cache` left to the attention that follows it (the QKV
    /// rows, the layer, its RoPE): the decode kernel rotates and writes the cache itself.
    fused_rope: Option<(Act, usize, usize)>,
}

fn backend_error(e: CudaError) -> ModelError {
    ModelError::Backend(format!("CUDA: {e}"))
}

fn internal(what: String) -> ModelError {
    ModelError::Backend(format!("CUDA forward: {what}"))
}

/// The arena `model`'s forward needs: the slots of a planning run through the fused path and
/// through the unfused one, by width, the more of each.
pub(crate) fn plan(model: &GpuModel) -> Result<ArenaPlan, ModelError> {
    let mut need: std::collections::BTreeMap<usize, usize> = Default::default();
    for gemv in [true, false] {
        let mut ops = GpuOps::new(model, None, 1, 1, gemv, Vec::new());
        ops.run()?;
        let mut counts: std::collections::BTreeMap<usize, usize> = Default::default();
        for bytes in ops.slot_bytes {
            *counts.entry(bytes).or_default() += 1;
        }
        for (bytes, count) in counts {
            let entry = need.entry(bytes).or_default();
            *entry = (*entry).max(count);
        }
    }
    Ok(need.into_iter().flat_map(|(bytes, count)| std::iter::repeat_n(bytes, count)).collect())
}

/// Enqueues the forward of `n` tokens, the logits of `rows` of them into `launch.scratch.logits`.
pub(crate) fn enqueue(model: &GpuModel, launch: Launch<'_>, n: usize, rows: usize, gemv: bool) -> Result<(), CudaError> {
    let slot_bytes = launch.scratch.slot_bytes().to_vec();
    let mut ops = GpuOps::new(model, Some(launch), n, rows, gemv, slot_bytes);
    ops.run().map_err(CudaError::Model)?;
    if ops.fused_rope.is_some() {
        return Err(CudaError::Model(internal("RoPE left to an attention that never ran".into())));
    }
    ops.mark("end").map_err(CudaError::Model)
}

impl<'a> GpuOps<'a> {
    fn new(model: &'a GpuModel, launch: Option<Launch<'a>>, n: usize, rows: usize, gemv: bool, slot_bytes: Vec<usize>) -> Self {
        let busy = vec![false; slot_bytes.len()];
        GpuOps {
            model,
            launch,
            n,
            rows,
            gemv,
            slot_bytes,
            busy,
            acts: Vec::new(),
            pending: Vec::new(),
            deferred: Vec::new(),
            fused_rope: None,
        }
    }

    fn run(&mut self) -> Result<(), ModelError> {
        let model = self.model;
        let config = model.config();
        config.architecture.forward(config, model.weights(), self)
    }

    fn dev(&self) -> &'a GpuDevice {
        self.model.device()
    }

    fn mark(&self, kind: &'static str) -> Result<(), ModelError> {
        let Some(launch) = &self.launch else { return Ok(()) };
        match launch.profiler.borrow_mut().as_mut() {
            Some(profiler) => profiler.mark(self.dev(), kind).map_err(backend_error),
            None => Ok(()),
        }
    }

    /// One block per token row, threads for `width` elements.
    fn rows_config(&self, rows: usize, width: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 }
    }

    fn alloc(&mut self, width: usize, element_bytes: usize) -> Result<Act, ModelError> {
        let bytes = width * element_bytes;
        let free = (0..self.slot_bytes.len()).find(|&s| !self.busy[s] && self.slot_bytes[s] == bytes);
        let slot = match free {
            Some(slot) => slot,
            None if self.launch.is_none() => {
                self.slot_bytes.push(bytes);
                self.busy.push(false);
                self.slot_bytes.len() - 1
            }
            None => return Err(internal(format!("the activation arena has no free slot of {bytes} bytes per token"))),
        };
        self.busy[slot] = true;
        self.acts.push(ActState { slot: Some(slot), width, f32: element_bytes == 4, pending: None, consumed: false });
        Ok(Act(self.acts.len() - 1))
    }

    fn alloc_bf16(&mut self, width: usize) -> Result<Act, ModelError> {
        self.alloc(width, 2)
    }

    fn state(&self, act: Act) -> Result<&ActState, ModelError> {
        self.acts.get(act.0).filter(|s| s.slot.is_some()).ok_or_else(|| internal(format!("{act:?} is not live")))
    }

    /// The device address of a computed activation.
    fn ptr(&self, act: Act) -> Result<CUdeviceptr, ModelError> {
        let state = self.state(act)?;
        if state.pending.is_some() || state.consumed {
            return Err(internal(format!("{act:?} is read before it is computed")));
        }
        Ok(match &self.launch {
            Some(launch) => launch.scratch.slot_ptr(self.dev(), state.slot.expect("live")),
            None => 0,
        })
    }

    /// The address an output is written to (pending or not).
    fn out_ptr(&self, act: Act) -> Result<CUdeviceptr, ModelError> {
        let slot = self.state(act)?.slot.expect("live");
        Ok(self.launch.as_ref().map_or(0, |launch| launch.scratch.slot_ptr(self.dev(), slot)))
    }

    fn release(&mut self, act: Act) {
        if let Some(slot) = self.acts[act.0].slot.take() {
            self.busy[slot] = false;
        }
    }

    /// Sets (or clears) `act`'s pending computation.
    fn set_pending(&mut self, act: Act, pending: Option<Pending>) {
        self.acts[act.0].pending = pending;
        self.pending.retain(|&a| a != act);
        if pending.is_some() {
            self.pending.push(act);
        }
        self.release_deferred();
    }

    /// Releases the freed activations no pending output reads any more.
    fn release_deferred(&mut self) {
        let mut still = std::mem::take(&mut self.deferred);
        still.retain(|&act| {
            let read = self.pending.iter().any(|p| self.acts[p.0].pending.is_some_and(|pending| pending.reads(act)));
            if !read {
                self.release(act);
            }
            read
        });
        self.deferred = still;
    }

    /// Computes `act` if it is pending.
    fn resolve(&mut self, act: Act) -> Result<(), ModelError> {
        let Some(pending) = self.acts[act.0].pending else { return Ok(()) };
        let out = self.out_ptr(act)?;
        let width = self.acts[act.0].width;
        match pending {
            Pending::AddNorm { residual, delta, weight, eps, delta_scales, delta_partials } => {
                // A delta whose scales or partials are folded here was marked consumed (its bytes
                // are not its values): its address, not `ptr`'s check.
                let d = match delta {
                    Some(d) if delta_scales.is_some() || delta_partials.is_some() => self.out_ptr(d)?,
                    Some(d) => self.ptr(d)?,
                    None => 0,
                };
                let x = self.ptr(residual)?;
                self.mark("add_rmsnorm")?;
                if self.launch.is_some() {
                    let config = norm_config(self.n, width);
                    // SAFETY: residual, delta and out hold `n` rows of `width`; the weight `width`;
                    // the scales (if any) `n` and `width` floats; the partials (if any) `splits`
                    // blocks of `n` rows of `width`, written by `split_k_partials` for this
                    // forward's rows.
                    unsafe {
                        match delta_partials {
                            Some((partials, splits)) => {
                                let stride = (self.n * width) as u64;
                                launchers::fused_add_rmsnorm_partials(self.dev(), config, x, partials, splits as i32, stride, weight, out, width as i32, eps)
                            }
                            None => {
                                let (row_scales, col_scales) = delta_scales.unwrap_or((0, 0));
                                launchers::fused_add_rmsnorm(self.dev(), config, x, d, row_scales, col_scales, weight, out, width as i32, eps)
                            }
                        }
                        .map_err(backend_error)?
                    };
                }
            }
            Pending::SiluMul { gate_up } => {
                let input = self.ptr(gate_up)?;
                self.mark("activation")?;
                if self.launch.is_some() {
                    let config = gated_config(self.n, width);
                    // SAFETY: gate_up holds `n` rows of `2 * width`, out `n` rows of `width`.
                    unsafe { launchers::silu_and_mul(self.dev(), config, out, input, 0, 0, width as i32).map_err(backend_error)? };
                }
            }
            Pending::Merge(merge) => {
                self.mark("attention merge")?;
                if self.launch.is_some() {
                    merge.launch(self.dev()).map_err(backend_error)?;
                }
            }
            Pending::SplitSum { partials, splits } => {
                self.mark("split-K sum")?;
                if self.launch.is_some() {
                    let elements = self.n * width;
                    let config = grid_stride_config(elements);
                    // SAFETY: `out` holds `n` rows of `width` bf16 values, the partials `splits`
                    // blocks of as many floats.
                    unsafe {
                        launchers::sum_partials_bf16(self.dev(), config, out, partials, splits as i32, elements as u64, elements as u64)
                            .map_err(backend_error)?
                    };
                }
            }
            Pending::Fp8Scales { rows, cols } => {
                self.mark("linear")?;
                if self.launch.is_some() {
                    // SAFETY: `out` holds `n` rows of `width` bf16 values, the scales `n` and
                    // `width` floats (the FP8 input scratch still holds this product's).
                    unsafe { scale_output(self.dev(), out, (rows, cols), self.n, width).map_err(backend_error)? };
                }
            }
        }
        self.set_pending(act, None);
        Ok(())
    }

    /// Takes `act`'s pending FP8 scales for the caller to fold into the kernel it launches next:
    /// `act` is then marked consumed, since its bytes are not its values.
    fn take_fp8_scales(&mut self, act: Act) -> Option<(CUdeviceptr, CUdeviceptr)> {
        let Some(Pending::Fp8Scales { rows, cols }) = self.acts.get(act.0)?.pending else { return None };
        self.set_pending(act, None);
        self.acts[act.0].consumed = true;
        Some((rows, cols))
    }

    /// Takes `act`'s pending split partials for the caller to fold into the kernel it launches
    /// next: `act` is then marked consumed, as for `take_fp8_scales`.
    fn take_split_partials(&mut self, act: Act) -> Option<(CUdeviceptr, usize)> {
        let Some(Pending::SplitSum { partials, splits }) = self.acts.get(act.0)?.pending else { return None };
        self.set_pending(act, None);
        self.acts[act.0].consumed = true;
        Some((partials, splits))
    }

    /// Computes every pending output but `except`.
    fn resolve_all(&mut self, except: Option<Act>) -> Result<(), ModelError> {
        for act in self.pending.clone() {
            if Some(act) != except {
                self.resolve(act)?;
            }
        }
        Ok(())
    }

    /// Whether the GEMV takes an `[m, k]` input (of a bf16 weight, the stricter format: an FP8
    /// one takes every K a bf16 one does but those not a multiple of 16, which no model has): the
    /// fused element-wise steps stay pending on this, and the product decides (`gemv_runs`).
    fn gemv_takes(&self, m: usize, k: usize) -> bool {
        self.gemv && gemv_supports(m, k, WeightFormat::Bf16)
    }

    /// Whether the GEMV runs the product of an `[m, k]` input with `w` (`[n, k]`).
    fn gemv_runs(&self, m: usize, w: &GpuMatrix) -> bool {
        // A device that allows less shared memory than the format's GEMV may take (sm_86: 99 KB
        // against the GGUF GEMV's 200) runs the larger stagings through cuBLAS instead.
        let fits = super::launch::gemv_block_fit(m, w.cols, w.format(), super::launch::GEMV_WARPS, self.dev().max_shared_optin).is_some();
        self.gemv && fits && gemv_prefers(m, w.cols, w.rows, w.format())
    }

    /// Whether the skinny kernel runs the product of `m` rows with `w` (bf16, its rows, K a
    /// multiple of 64), taking a plain or SiLU-and-multiply input.
    fn skinny_runs(&self, m: usize, w: &GpuMatrix) -> bool {
        self.gemv && w.format() == WeightFormat::Bf16 && skinny::prefers(self.dev(), m, w.cols, w.rows)
    }

    /// Slices of K for a bf16 cuBLAS product of `m` rows, K `k`, N `n` whose consumer may finish
    /// it: `launch::split_k_splits`'s answer where the scratch has room for the partials, else 1.
    fn split_k_room(&self, m: usize, k: usize, n: usize) -> usize {
        let Some(launch) = &self.launch else { return 1 };
        let dev = self.dev();
        match split_k_splits(dev.split_k(), dev.split_k_slices(), m, k, n) {
            splits if splits > 1 && launch.scratch.holds_product_partials(splits * m * n) => splits,
            _ => 1,
        }
    }

    /// Marks a plain-input product of `m` rows with `w` as `linear`, or as `linear split-K` when
    /// `product` will leave it in K slices (`bench gpu`'s breakdown shows them apart; `check`
    /// counts them). Only a profiled step asks which: the others skip the question.
    fn mark_linear(&self, m: usize, w: &GpuMatrix) -> Result<(), ModelError> {
        let profiled = self.launch.as_ref().is_some_and(|l| l.profiler.borrow().is_some());
        let split = profiled
            && w.bias.is_none()
            && w.format() == WeightFormat::Bf16
            && !self.gemv_runs(m, w)
            && !self.skinny_runs(m, w)
            && self.split_k_room(m, w.cols, w.rows) > 1;
        self.mark(if split { "linear split-K" } else { "linear" })
    }

    /// `out = input · wᵀ (+ bias)` for `m` rows: through the GEMV (bias fused) where it takes
    /// the shape, else cuBLAS (or cuBLASLt's FP8 GEMM for an FP8 weight) and `add_bias`. With
    /// `leave_scales` (the consumer may finish the product), an FP8 GEMM's output is left unscaled
    /// and its scales are the answer (for `Pending::Fp8Scales`), and a bf16 product that splits
    /// over K (`launch::split_k_splits`) is left as its partials (for `Pending::SplitSum`),
    /// unless a bias has to be added after them.
    fn product(&self, out: CUdeviceptr, out_type: OutType, input: GemvInput, w: &GpuMatrix, m: usize, leave_scales: bool) -> Result<Option<Left>, ModelError> {
        let Some(launch) = &self.launch else { return Ok(None) };
        if launch.omit == Omit::Products {
            return Ok(None);
        }
        let dev = self.dev();
        let bias = w.bias.as_ref().map_or(0, |b| ptr(dev, b));
        let (k, n) = (w.cols, w.rows);
        let weight = w.weight(dev);
        if self.gemv_runs(m, w) {
            // SAFETY: `out` holds `m` rows of `n`, the input `m` rows of `k` (as staged), `w` and
            // `bias` the matrix's.
            return unsafe { gemv(dev, &Gemv { out, out_type, input, w: weight, bias, m, k, n }).map(|_| None).map_err(backend_error) };
        }
        let mut left = None;
        match (weight, skinny_input(input).filter(|_| self.skinny_runs(m, w))) {
            // SAFETY: as above (a SiLU input is `m` rows of `2 * k`).
            (GemvWeight::Bf16(w), Some(x)) => unsafe { skinny::skinny_linear(dev, out, out_type, x, w, m, k, n).map_err(backend_error)? },
            (weight, _) => {
                let GemvInput::Plain(input) = input else {
                    return Err(internal("a fused input outside the GEMV and the skinny kernel".into()));
                };
                match weight {
                    GemvWeight::Bf16(w) => {
                        // A product its consumer may finish, in K slices where that pays.
                        let splits = if leave_scales && bias == 0 && out_type == OutType::Bf16 { self.split_k_room(m, k, n) } else { 1 };
                        match launch.scratch.product_partials(dev, splits * m * n).filter(|_| splits > 1) {
                            Some(partials) => {
                                // SAFETY: as above; the partials hold `splits * m * n` floats.
                                unsafe { split_k_partials(dev, partials, input, w, m, k, n, splits).map_err(backend_error)? };
                                left = Some(Left::SplitPartials(partials, splits));
                            }
                            // SAFETY: as above.
                            None => unsafe { cublas_linear(dev, out, out_type, input, w, m, k, n).map_err(backend_error)? },
                        }
                    }
                    GemvWeight::Fp8 { values, scales } => {
                        let (input_fp8, input_scales) =
                            launch.scratch.fp8_input(dev).ok_or_else(|| internal("an FP8 product without room for its quantized input".into()))?;
                        if out_type != OutType::Bf16 {
                            return Err(internal("an FP8 product into float32".into()));
                        }
                        let p = Fp8Product { out, input, weight: values, weight_scales: scales, input_fp8, input_scales, m, k, n };
                        // SAFETY: as above; the scratch's FP8 room holds `m` rows of the widest FP8 input.
                        // A bias is added to the scaled product, so then the scales cannot wait.
                        unsafe {
                            if leave_scales && bias == 0 {
                                left = fp8_linear_leaving_scales(dev, &p).map_err(backend_error)?.map(|(rows, cols)| Left::Fp8Scales(rows, cols));
                            } else {
                                fp8_linear(dev, &p).map_err(backend_error)?;
                            }
                        }
                    }
                    GemvWeight::Ggml { ty, blocks } => {
                        let tile = launch.scratch.ggml_tile(dev).ok_or_else(|| internal("a quantized GGUF product without its dequantization tile".into()))?;
                        // SAFETY: as above; the tile holds `tile.1` bf16 values.
                        unsafe { ggml_linear(dev, out, out_type, input, (ty, blocks), tile, m, k, n).map_err(backend_error)? };
                    }
                }
            }
        }
        if bias != 0 {
            let config = self.rows_config(m, n);
            // SAFETY: `out` holds `m` rows of `n` bf16 values; the bias `n`.
            unsafe { launchers::add_bias(dev, config, out, bias, n as i32).map_err(backend_error)? };
        }
        Ok(left)
    }

    fn release_or_defer(&mut self, act: Act) {
        if act.0 < self.acts.len() {
            self.deferred.push(act);
            self.release_deferred();
        }
    }
}

/// The skinny kernel's view of a GEMV input it can stage (plain or SiLU-and-multiply).
fn skinny_input(input: GemvInput) -> Option<SkinnyInput> {
    match input {
        GemvInput::Plain(x) => Some(SkinnyInput::Plain(x)),
        GemvInput::SiluMul(gate_up) => Some(SkinnyInput::SiluMul(gate_up)),
        _ => None,
    }
}

impl Ops for GpuOps<'_> {
    type Family = GpuWeights;

    fn free(&mut self, act: Act) {
        // A pending add+norm that nobody consumed still owes the residual its update.
        if let Some(Pending::AddNorm { delta: Some(_), .. }) = self.acts.get(act.0).and_then(|s| s.pending) {
            if let Err(e) = self.resolve(act) {
                tracing::error!("resolving a freed activation: {e}");
            }
        }
        if self.acts.get(act.0).is_some_and(|s| s.pending.is_some()) {
            self.set_pending(act, None);
        }
        self.release_or_defer(act);
    }

    fn embed(&mut self, table: &GpuMatrix, first_token: usize, multiplier: Option<f32>) -> Result<Act, ModelError> {
        let h = table.cols;
        let out = self.alloc(h, 4)?;
        self.mark("embedding")?;
        if let Some(launch) = &self.launch {
            let config = self.rows_config(self.n, h);
            let (o, t) = (self.out_ptr(out)?, table.bf16_ptr(self.dev()).map_err(backend_error)?);
            let (first, table_rows) = (first_token as i32, table.rows as i32);
            // SAFETY: `out` holds `n` rows of `h`, the table `table_rows` rows of `h`; a token
            // outside them embeds as zeros.
            unsafe {
                launchers::embedding_gather(self.dev(), config, o, t, launch.arrays.tokens, h as i32, multiplier.unwrap_or(1.0), first, table_rows)
                    .map_err(backend_error)?
            };
        }
        Ok(out)
    }

    fn all_reduce(&mut self, act: Act) -> Result<(), ModelError> {
        let Some(comm) = self.collective()? else { return Ok(()) };
        self.resolve(act)?;
        let (width, f32) = (self.state(act)?.width, self.state(act)?.f32);
        let buffer = self.ptr(act)?;
        self.mark("all_reduce")?;
        if self.launch.is_some() {
            let elem = if f32 { Elem::F32 } else { Elem::Bf16 };
            // SAFETY: `act` holds `n` rows of `width` in the arena, which outlives the step; every
            // rank runs the same forward, so the same collectives in the same order.
            unsafe { comm.all_reduce_sum(buffer, self.n * width, elem, self.dev().stream.cu_stream()) }.map_err(backend_error)?;
        }
        Ok(())
    }

    fn all_gather_logits(&mut self) -> Result<(), ModelError> {
        let Some(comm) = self.collective()? else { return Ok(()) };
        let rows = self.rows;
        let Some(launch) = &self.launch else { return Ok(()) };
        if rows == 0 {
            return Ok(());
        }
        let dev = self.dev();
        let vocab = self.model.config().vocab_size;
        let per_rank = vocab_per_rank(vocab, comm.world());
        let (logits, gathered) = (launch.scratch.logits_ptr(dev), launch.scratch.gathered_ptr(dev));
        self.mark("all_gather logits")?;
        // SAFETY: `logits` holds `rows` rows of the whole vocabulary (room for this rank's
        // `rows * per_rank`, its range and then padding), `gathered` `rows * per_rank` for every
        // rank (`Scratch::ensure`); the kernel reads each rank's `[rows, width_r]` back into
        // `logits` after the gather, on the same stream.
        unsafe {
            comm.all_gather(logits, gathered, rows * per_rank, Elem::F32, dev.stream.cu_stream()).map_err(backend_error)?;
            launchers::gather_vocab_ranges(dev, self.rows_config(rows, vocab), logits, gathered, rows as i32, per_rank as i32, vocab as i32)
                .map_err(backend_error)?;
        }
        Ok(())
    }

    fn add_norm(&mut self, residual: Act, delta: Option<Act>, weight: &cudarc::driver::CudaSlice<f32>, norm: Norm) -> Result<Act, ModelError> {
        let h = self.state(residual)?.width;
        // A delta straight from an FP8 GEMM: its scales go into this launch (made right away:
        // the GEMV does not take the batch), the delta's own bytes stay unscaled.
        let folded = delta.filter(|_| !self.gemv_takes(self.n, h)).and_then(|d| self.take_fp8_scales(d));
        // A split product's partials: summed in this launch (no GEMV stages them: a product
        // that takes this output resolves it first).
        let partials = delta.and_then(|d| self.take_split_partials(d));
        self.resolve_all(None)?;
        let out = self.alloc_bf16(h)?;
        let weight = self.launch.as_ref().map_or(0, |_| ptr(self.dev(), weight));
        self.set_pending(out, Some(Pending::AddNorm { residual, delta, weight, eps: norm.eps, delta_scales: folded, delta_partials: partials }));
        if !self.gemv_takes(self.n, h) {
            self.resolve(out)?;
        }
        Ok(out)
    }

    fn norm(&mut self, x: Act, weight: &cudarc::driver::CudaSlice<f32>, norm: Norm) -> Result<Act, ModelError> {
        self.resolve_all(None)?;
        let (width, f32) = (self.state(x)?.width, self.state(x)?.f32);
        if f32 {
            return Err(internal("a norm of the float32 residual outside add_norm".into()));
        }
        let input = self.ptr(x)?;
        let out = self.alloc_bf16(width)?;
        self.mark("norm")?;
        if self.launch.is_some() {
            let config = self.rows_config(self.n, width);
            let (o, w) = (self.out_ptr(out)?, ptr(self.dev(), weight));
            // SAFETY: `x` and `out` hold `n` rows of `width`, the weight `width`.
            unsafe { launchers::rmsnorm_bf16(self.dev(), config, input, w, o, width as i32, norm.eps).map_err(backend_error)? };
        }
        Ok(out)
    }

    fn linear(&mut self, x: Act, w: &GpuMatrix) -> Result<Act, ModelError> {
        self.resolve_all(Some(x))?;
        let (m, n) = (self.n, w.rows);
        let pending = self.state(x)?.pending;
        let stages = |mode| gemv_mode_rows(mode).contains(&gemv_padded_rows(m));
        let fusable = match pending {
            Some(Pending::Merge(_)) => stages(GemvMode::Merge),
            Some(Pending::Fp8Scales { .. } | Pending::SplitSum { .. } | Pending::AddNorm { delta_partials: Some(_), .. }) => false,
            _ => true,
        };
        // The skinny kernel stages a SiLU-and-multiply too (not a norm or a merge).
        let fused = self.gemv_runs(m, w) || (matches!(pending, Some(Pending::SiluMul { .. })) && self.skinny_runs(m, w));
        if pending.is_some() && (!fused || !fusable) {
            self.resolve(x)?;
        }
        let out = self.alloc_bf16(n)?;
        let o = self.out_ptr(out)?;
        match self.acts[x.0].pending {
            None => {
                let input = self.ptr(x)?;
                self.mark_linear(m, w)?;
                match self.product(o, OutType::Bf16, GemvInput::Plain(input), w, m, true)? {
                    Some(Left::Fp8Scales(rows, cols)) => self.set_pending(out, Some(Pending::Fp8Scales { rows, cols })),
                    Some(Left::SplitPartials(partials, splits)) => self.set_pending(out, Some(Pending::SplitSum { partials, splits })),
                    None => {}
                }
            }
            Some(Pending::AddNorm { delta_scales: Some(_), .. } | Pending::AddNorm { delta_partials: Some(_), .. })
            | Some(Pending::Fp8Scales { .. } | Pending::SplitSum { .. }) => {
                return Err(internal(format!("{x:?}: a pending output no GEMV stages")));
            }
            Some(Pending::AddNorm { residual, delta, weight, eps, delta_scales: None, delta_partials: None }) => {
                // The GEMV writes `residual + delta` into a fresh slot and the residual moves there.
                let h = self.state(residual)?.width;
                let moved = delta.map(|_| self.alloc(h, 4)).transpose()?;
                let input = GemvInput::AddNorm {
                    residual: self.ptr(residual)?,
                    delta: delta.map(|d| self.ptr(d)).transpose()?.unwrap_or(0),
                    weight,
                    residual_out: moved.map(|r| self.out_ptr(r)).transpose()?.unwrap_or(0),
                    rows: 0,
                    eps,
                };
                self.mark("gemv +add+norm")?;
                self.product(o, OutType::Bf16, input, w, m, false)?;
                if let Some(moved) = moved {
                    let old = self.acts[residual.0].slot;
                    self.acts[residual.0].slot = self.acts[moved.0].slot.take();
                    if let Some(old) = old {
                        self.busy[old] = false;
                    }
                }
                self.acts[x.0].consumed = true;
                self.set_pending(x, None);
            }
            Some(Pending::SiluMul { gate_up }) => {
                let input = GemvInput::SiluMul(self.ptr(gate_up)?);
                self.mark("gemv +silu")?;
                self.product(o, OutType::Bf16, input, w, m, false)?;
                self.acts[x.0].consumed = true;
                self.set_pending(x, None);
            }
            Some(Pending::Merge(merge)) => {
                let (part_out, part_max, part_sum) = merge.partials;
                let input = GemvInput::Merge { part_out, part_max, part_sum, splits: merge.splits, head_dim: merge.head_dim };
                self.mark("gemv +merge")?;
                self.product(o, OutType::Bf16, input, w, m, false)?;
                self.acts[x.0].consumed = true;
                self.set_pending(x, None);
            }
        }
        Ok(out)
    }

    fn head_norm(&mut self, qkv: Act, first_head: usize, num_heads: usize, weight: &cudarc::driver::CudaSlice<f32>, norm: Norm) -> Result<(), ModelError> {
        self.resolve_all(None)?;
        let x = self.ptr(qkv)?;
        let width = self.state(qkv)?.width;
        let head_dim = self.model.config().head_dim;
        self.mark("head_norm")?;
        if self.launch.is_some() {
            let config = LaunchConfig { grid_dim: (self.n as u32, num_heads.div_ceil(4) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let w = ptr(self.dev(), weight);
            let (width, first, heads, hd) = (width as i32, first_head as i32, num_heads as i32, head_dim as i32);
            // SAFETY: `qkv` holds `n` rows of `width`, the heads lie inside them, the weight `head_dim`.
            unsafe { launchers::head_rmsnorm(self.dev(), config, x, w, width, first, heads, hd, norm.eps).map_err(backend_error)? };
        }
        Ok(())
    }

    fn rope_and_cache(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<(), ModelError> {
        // Decode tokens only (each its sequence's only token): the attention kernel does this,
        // rotate-half as below (`FusedRope` has no interleaved form; nothing launches one here).
        // A QKV product left split over K stays so: the attention kernel sums its partials.
        if self.launch.as_ref().is_some_and(|launch| self.dev().fused_rope && launch.arrays.num_tiles == 0) {
            self.resolve_all(Some(qkv))?;
            self.fused_rope = Some((qkv, layer, attention.rope));
            return Ok(());
        }
        self.resolve_all(None)?;
        let x = self.ptr(qkv)?;
        let c = self.model.config();
        let Some(launch) = &self.launch else { return Ok(()) };
        let dev = self.dev();
        self.mark("rope_and_cache")?;
        let rope = &self.model.ropes()[attention.rope];
        let (k_cache, v_cache) = launch.cache.layer_ptrs(dev, layer);
        let config = self.rows_config(self.n, (c.num_attention_heads + c.num_key_value_heads) * c.rotary_dim / 2);
        let (heads, kv_heads, hd) = (c.num_attention_heads as i32, c.num_key_value_heads as i32, c.head_dim as i32);
        let block_size = launch.cache.layout().block_size as i32;
        // SAFETY: `qkv` holds `n` rows; positions and slots `n` entries inside the cache.
        unsafe {
            launchers::rope_and_cache(
                dev,
                launch.cache.dtype(),
                config,
                x,
                launch.arrays.positions,
                launch.arrays.slots,
                ptr(dev, &rope.inv_freq),
                k_cache,
                v_cache,
                heads,
                kv_heads,
                hd,
                block_size,
                rope.position_scale,
                0,
                c.rotary_dim as i32,
                rope.magnitude,
            )
            .map_err(backend_error)?;
        }
        Ok(())
    }

    fn attention(&mut self, qkv: Act, layer: usize, attention: &LayerAttention) -> Result<Act, ModelError> {
        // RoPE left to this attention by `rope_and_cache` (only ever with a launch to run).
        let fused_rope = match self.fused_rope.take() {
            None => None,
            Some((act, l, rope)) if act == qkv && l == layer => Some(rope),
            Some(_) => return Err(internal(format!("RoPE of another layer left to layer {layer}'s attention"))),
        };
        // The fused RoPE reads a split QKV product's partials itself (their sum is never written).
        let qkv_partials = if fused_rope.is_some() { self.take_split_partials(qkv) } else { None };
        self.resolve_all(None)?;
        if attention.softcap.is_some() {
            return Err(ModelError::Unsupported("attention soft-capping on the GPU".into()));
        }
        let q = if qkv_partials.is_some() { self.out_ptr(qkv)? } else { self.ptr(qkv)? };
        let c = self.model.config();
        let out = self.alloc_bf16(c.q_size())?;
        self.mark(if qkv_partials.is_some() { "attention +QKV sum" } else { "attention" })?;
        let Some(launch) = &self.launch else { return Ok(out) };
        let dev = self.dev();
        let (k_cache, v_cache) = launch.cache.layer_ptrs(dev, layer);
        let s = launch.scratch;
        let partials = if launch.split.splits > 1 { s.partials(dev) } else { (0, 0, 0) };
        let a = launch.arrays;
        let rope = fused_rope.map(|rope| {
            let rope = &self.model.ropes()[rope];
            FusedRope {
                slots: a.slots,
                inv_freq: ptr(dev, &rope.inv_freq),
                position_scale: rope.position_scale,
                rotary_dim: c.rotary_dim,
                magnitude: rope.magnitude,
                qkv_partials: qkv_partials.map(|(partials, splits)| (partials, splits, self.n * c.qkv_size())),
            }
        });
        if launch.omit == Omit::Attention {
            return Ok(out);
        }
        // One decode token's split partials are merged by the o-projection's GEMV staging when
        // it runs (`linear`), else by the merge kernel when the output is first read (`resolve`);
        // `FusedMerge` says which formats and why.
        let o_proj = &self.model.weights().layers[layer].o_proj;
        let ggml_o_proj = matches!(o_proj.format(), WeightFormat::Ggml(_));
        // A small batch's decode attention is latency-bound and leaves DRAM idle: its blocks pull
        // the o-projection's weights into L2 for the product that follows.
        let (o_values, o_bytes) = o_proj.values_region(dev);
        let l2_prefetch = if a.num_decode > 0 && L2_PREFETCH_ROWS.contains(&self.n) && o_bytes <= dev.l2_prefetch_limit {
            (o_values, o_bytes / 16 * 16)
        } else {
            (0, 0)
        };
        let defer_merge = dev.fused_merge.takes(ggml_o_proj) && self.gemv && self.n == 1 && a.num_tiles == 0 && launch.split.splits > 1;
        let args = AttentionArgs {
            out: self.out_ptr(out)?,
            q,
            q_stride: c.qkv_size(),
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
            block_size: launch.cache.layout().block_size,
            window: attention.window.unwrap_or(0),
            scale: attention.scale,
            split: launch.split,
            partials,
            rope,
            defer_merge,
            l2_prefetch,
            kv_evict_first: dev.kv_evict_first,
            cache: launch.cache.dtype(),
        };
        launch_attention(dev, &args).map_err(backend_error)?;
        if let Some(merge) = SplitMerge::of(&args).filter(|_| defer_merge) {
            self.set_pending(out, Some(Pending::Merge(merge)));
        }
        Ok(out)
    }

    fn gated_activation(&mut self, gate_up: Act, activation: Activation) -> Result<Act, ModelError> {
        let inter = self.state(gate_up)?.width / 2;
        let skinny_takes = self.gemv && skinny::takes(self.dev(), self.n, inter);
        let staged = activation == Activation::Silu && (self.gemv_takes(self.n, inter) || skinny_takes);
        // Straight from an FP8 GEMM (and not left to the GEMV): the scales go into this launch.
        let folded = if staged { None } else { self.take_fp8_scales(gate_up) };
        self.resolve_all(None)?;
        let input = if folded.is_some() { self.out_ptr(gate_up)? } else { self.ptr(gate_up)? };
        let out = self.alloc_bf16(inter)?;
        if staged {
            self.set_pending(out, Some(Pending::SiluMul { gate_up }));
            return Ok(out);
        }
        self.mark("activation")?;
        if self.launch.is_some() {
            let o = self.out_ptr(out)?;
            self.gated(activation, o, input, self.n, inter, folded)?;
        }
        Ok(out)
    }

    fn moe(&mut self, x: Act, weights: &MoeWeights<GpuWeights>, config: &MoeConfig, activation: Activation) -> Result<Act, ModelError> {
        self.resolve_all(None)?;
        let (experts, k, inter) = (config.num_experts, config.top_k, config.expert_intermediate_size);
        if experts > MOE_MAX_EXPERTS || k > MOE_MAX_TOP_K {
            return Err(ModelError::Unsupported(format!("{experts} experts, top-{k} on the GPU (at most {MOE_MAX_EXPERTS}, top-{MOE_MAX_TOP_K})")));
        }
        let input = self.ptr(x)?;
        let h = self.state(x)?.width;
        // Per token: router logits, k expert ids and weights, k rows of each product; the
        // grouping's arrays are sized per token too (n ≥ 1 covers their fixed parts).
        let logits = self.alloc(experts, 4)?;
        let ids = self.alloc(k, 4)?;
        let gate_weights = self.alloc(k, 4)?;
        let offsets = self.alloc(experts + 2, 4)?;
        let sorted = self.alloc(k, 4)?;
        let tiles = self.alloc(3 * (k + experts), 4)?;
        let gate_up = self.alloc_bf16(k * 2 * inter)?;
        let act = self.alloc_bf16(k * inter)?;
        let down = self.alloc_bf16(k * h)?;
        let out = self.alloc_bf16(h)?;
        self.mark("moe")?;
        // Timing without the products leaves the whole block out: the routing reads the router's
        // logits, which would be garbage, as expert ids.
        if self.launch.as_ref().is_some_and(|l| l.omit != Omit::Products) {
            let dev = self.dev();
            let p = |a: Act| self.out_ptr(a);
            let (logits_p, ids_p, weights_p, offsets_p, sorted_p, tiles_p) = (p(logits)?, p(ids)?, p(gate_weights)?, p(offsets)?, p(sorted)?, p(tiles)?);
            let (gate_up_p, act_p, down_p, out_p) = (p(gate_up)?, p(act)?, p(down)?, p(out)?);
            let n = self.n;
            let assignments = n * k;
            self.product(logits_p, OutType::F32, GemvInput::Plain(input), &weights.router, n, false)?;
            let most_tiles = moe_most_tiles(assignments, experts);
            let gemm = |cols: usize| moe_gemm_config(cols, most_tiles);
            let num_tiles = offsets_p + 4 * (experts as u64 + 1);
            let (e, ki, hi, ii) = (experts as i32, k as i32, h as i32, inter as i32);
            // SAFETY: every buffer was allocated above for `n` tokens at the widths the kernels
            // read and write (see `kernels/moe.cu`); the weights are the stacked experts'.
            unsafe {
                launchers::moe_route(dev, moe_route_config(n), logits_p, ids_p, weights_p, n as i32, e, ki, i32::from(config.norm_topk_prob))
                    .map_err(backend_error)?;
                launchers::moe_group(dev, MOE_GROUP_CONFIG, ids_p, assignments as i32, e, offsets_p, sorted_p, tiles_p).map_err(backend_error)?;
                let gate_up_w = weights.gate_up.bf16_ptr(dev).map_err(backend_error)?;
                launchers::moe_gemm(dev, gemm(2 * inter), gate_up_p, input, gate_up_w, sorted_p, tiles_p, num_tiles, ki, 2 * ii, hi)
                    .map_err(backend_error)?;
            }
            self.gated(activation, act_p, gate_up_p, assignments, inter, None)?;
            // SAFETY: as above.
            unsafe {
                let down_w = weights.down.bf16_ptr(dev).map_err(backend_error)?;
                launchers::moe_gemm(dev, gemm(h), down_p, act_p, down_w, sorted_p, tiles_p, num_tiles, 1, hi, ii).map_err(backend_error)?;
                launchers::moe_combine(dev, self.rows_config(n, h), out_p, down_p, weights_p, ki, hi).map_err(backend_error)?;
            }
        }
        for temporary in [logits, ids, gate_weights, offsets, sorted, tiles, gate_up, act, down] {
            self.release(temporary);
        }
        Ok(out)
    }

    fn logits(
        &mut self,
        residual: Act,
        delta: Option<Act>,
        final_norm: &cudarc::driver::CudaSlice<f32>,
        norm: Norm,
        lm_head: &GpuMatrix,
        softcap: Option<f32>,
    ) -> Result<(), ModelError> {
        self.resolve_all(None)?;
        let rows = self.rows;
        let x = self.ptr(residual)?;
        let d = delta.map(|d| self.ptr(d)).transpose()?.unwrap_or(0);
        let Some(launch) = &self.launch else { return Ok(()) };
        if rows == 0 {
            return Ok(());
        }
        let dev = self.dev();
        let (h, vocab) = (lm_head.cols, lm_head.rows);
        let s = launch.scratch;
        let logits = s.logits_ptr(dev);
        let w = ptr(dev, final_norm);
        if self.gemv_runs(rows, lm_head) {
            // The last block's output joins the residual inside the GEMV, for the wanted rows
            // only; nothing reads the residual after, so it is not written back.
            self.mark("gemv lm_head +add+norm")?;
            let input = GemvInput::AddNorm { residual: x, delta: d, weight: w, residual_out: 0, rows: launch.arrays.rows, eps: norm.eps };
            self.product(logits, OutType::F32, input, lm_head, rows, false)?;
        } else {
            self.mark("add_rmsnorm")?;
            let final_h = s.final_h_ptr(dev);
            // SAFETY: the residual and delta hold `n` rows of `h`; `a.rows` holds `rows` indices
            // of them; `final_h` holds `rows` rows.
            unsafe {
                if d != 0 {
                    launchers::fused_add_rmsnorm(dev, norm_config(self.n, h), x, d, 0, 0, w, 0, h as i32, norm.eps).map_err(backend_error)?;
                }
                launchers::rmsnorm_rows(dev, self.rows_config(rows, h), x, launch.arrays.rows, w, final_h, h as i32, norm.eps)
                    .map_err(backend_error)?;
            }
            self.mark("lm_head")?;
            self.product(logits, OutType::F32, GemvInput::Plain(final_h), lm_head, rows, false)?;
        }
        if let Some(cap) = softcap {
            self.mark("softcap")?;
            // SAFETY: `logits` holds `rows` rows of `vocab`.
            unsafe { launchers::softcap_rows(dev, self.rows_config(rows, vocab), logits, vocab as i32, cap).map_err(backend_error)? };
        }
        Ok(())
    }
}

impl<'a> GpuOps<'a> {
    /// The NCCL group the collectives go through: none for a whole model (they are nothing), the
    /// rank's for a shard, which cannot run without one.
    fn collective(&self) -> Result<Option<&'a RankComm>, ModelError> {
        let model: &'a GpuModel = self.model;
        match model.collective() {
            Some(comm) => Ok(Some(comm.as_ref())),
            None => match model.weights().shard.parallel.world {
                1 => Ok(None),
                world => Err(internal(format!("a shard of {world} tensor-parallel ranks without its NCCL communicator"))),
            },
        }
    }

    /// `out = act(gate) * up` over `rows` rows of `[gate | up]`, `inter` wide; `scales`: of an
    /// FP8 GEMM's unscaled `gate_up` (`rows` and `2 * inter` floats).
    fn gated(&self, activation: Activation, out: CUdeviceptr, gate_up: CUdeviceptr, rows: usize, inter: usize, scales: Option<(CUdeviceptr, CUdeviceptr)>) -> Result<(), ModelError> {
        let config = gated_config(rows, inter);
        let (row_scales, col_scales) = scales.unwrap_or((0, 0));
        // SAFETY: `gate_up` holds `rows` rows of `2 * inter`, `out` `rows` of `inter`.
        unsafe {
            match activation {
                Activation::Silu => launchers::silu_and_mul(self.dev(), config, out, gate_up, row_scales, col_scales, inter as i32),
                Activation::GeluTanh => launchers::gelu_tanh_and_mul(self.dev(), config, out, gate_up, row_scales, col_scales, inter as i32),
            }
            .map_err(backend_error)
        }
    }
}
