//! One GPU: its context, the stream all work goes to, a cuBLAS handle, the compiled kernels and
//! the device facts launch configurations need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use cudarc::driver::sys::CUfunction_attribute;

use super::fp8_gemm::Fp8Gemm;
use super::tuned_gemm::TunedGemm;
use super::skinny::{self, Skinny};
use super::kernels::Kernels;
use super::launch::{
    attention_shared_bytes, decode_kernel_name, decode_shared_bytes, gemv_dynamic_shared_limit, gemv_kernels, mmq_kernel_name, mmq_shared_bytes, mmq_supports, prefill_kernel_name,
    prefill_shared_bytes, WeightFormat, DECODE_THREADS, GGML_ONE_ROW_WARP_KERNELS,
};

const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
use super::CudaError;
use crate::kv_cache::KvCacheDtype;

pub struct GpuDevice {
    pub context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    _blas_workspace: cudarc::driver::CudaSlice<u8>,
    pub kernels: Kernels,
    pub name: String,
    pub arch: String,
    pub num_sms: usize,
    /// The memory's peak rate in GB/s, from its clock and bus width (the H100 80GB HBM3: 3,352),
    /// 0 where the driver does not give them; `bench gpu` measures what a copy reaches.
    pub peak_memory_gbps: f64,
    /// The most dynamic shared memory a block may opt in to (227 KB on sm_90).
    pub max_shared_optin: usize,
    /// Resident blocks per multiprocessor of the decode attention kernel, by head dimension.
    decode_blocks_per_sm: Vec<(usize, usize)>,
    /// Which of our kernels are launched as programmatic dependents of the kernel before them
    /// (see `launchers`), a `PdlScope`: on sm_90 and newer, unless `PAGEDSERVE_PDL=0`.
    pdl: AtomicU8,
    /// Whether decode-only batches leave RoPE and the cache write to the decode attention kernel
    /// (`AttentionArgs::rope`) instead of launching `rope_and_cache`: on unless
    /// `PAGEDSERVE_FUSED_ROPE=off`, which exists to measure the fusion.
    pub fused_rope: bool,
    /// Which o-projections merge a one-token split decode attention's partials in their GEMV's
    /// staging (`GemvInput::Merge`) instead of after an `attention_reduce` launch (`FusedMerge`).
    pub fused_merge: FusedMerge,
    /// The most bytes of the o-projection's weights the decode attention of a small batch pulls
    /// into L2 for it (`AttentionArgs::l2_prefetch`): three quarters of the L2 on sm_90 and newer
    /// (`cp.async.bulk.prefetch`), none before; `PAGEDSERVE_L2_PREFETCH=off` turns it off, `=N`
    /// sets N MB.
    pub l2_prefetch_limit: usize,
    /// Whether the decode attention reads the cache under an evict-first L2 policy
    /// (`AttentionArgs::kv_evict_first`): on unless `PAGEDSERVE_KV_EVICT_FIRST=off`, which exists
    /// to measure it.
    pub kv_evict_first: bool,
    /// Whether the serving decode graphs are also captured for shorter context tiers
    /// (`cuda::graphs`): on unless `PAGEDSERVE_GRAPH_TIERS=off`, which exists to measure them.
    pub graph_tiers: bool,
    /// Which bf16 cuBLAS products of 2-64 rows are cut into K slices whose float32 partials the
    /// residual add and norm after them sums (`launch::split_k_splits`): a `SplitK` as a byte.
    split_k: AtomicU8,
    /// Into how many K slices such a product is cut (`$PAGEDSERVE_SPLIT_K_SLICES`, 2 to
    /// `launch::SPLIT_K_MAX_SLICES`; `launch::SPLIT_K_SLICES` unless set).
    split_k_slices: AtomicU8,
    /// Resident blocks per multiprocessor of each GEMV kernel, by (kernel, threads, shared
    /// bytes): sizes its grid to one wave (`launch::gemv_grid`).
    gemv_occupancy: Mutex<HashMap<(String, u32, usize), usize>>,
    /// cuBLASLt, for the FP8 GEMMs (`cuda::fp8_gemm`), sharing the cuBLAS workspace.
    fp8_gemm: Mutex<Fp8Gemm>,
    /// The timed cuBLASLt path for bf16 products of a few rows (`cuda::tuned_gemm`) and the row
    /// counts that take it (`PAGEDSERVE_BLAS_TUNE`); `None` when off.
    tuned_gemm: Option<(std::ops::RangeInclusive<usize>, Mutex<TunedGemm>)>,
    /// Whether plain greedy samples take `greedy_chunks` (the argmax spread over the GPU)
    /// rather than one `sample_rows` block a row (the default; `PAGEDSERVE_GREEDY_CHUNKS=off`
    /// for the one-block path). On an H100 it took ~50 µs off the 8B served decode step at 1
    /// and 32 rows (BENCHMARKS.md, session 25).
    pub greedy_chunks: bool,
    /// The skinny tensor-core products' workspace and row range (`cuda::skinny`); `None` when
    /// `PAGEDSERVE_SKINNY=off` or a block's shared memory does not fit this device.
    pub skinny: Option<Skinny>,
}

/// Which kernels are launched as programmatic dependents (see `launchers::launch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdlScope {
    Off = 0,
    All = 1,
    /// Every kernel but the GEMV.
    AllButGemv = 2,
    /// Only the GEMV (whose first weight loads go before its wait).
    GemvOnly = 3,
    /// The GEMV and the decode attention's split merge (`attention_reduce_*`).
    GemvAndMerge = 4,
    /// The GEMV, the decode attention kernel and its split merge.
    GemvAndAttention = 5,
}

impl PdlScope {
    /// The default, or `$PAGEDSERVE_PDL`: `off` (or `0`), `all` (or `1`), `but-gemv`, `gemv-only`,
    /// `gemv-merge`, `gemv-attention`.
    pub fn from_env() -> Result<Self, super::CudaError> {
        match std::env::var("PAGEDSERVE_PDL").as_deref() {
            Err(_) => Ok(PdlScope::DEFAULT),
            Ok("0" | "off") => Ok(PdlScope::Off),
            Ok("1" | "all") => Ok(PdlScope::All),
            Ok("but-gemv") => Ok(PdlScope::AllButGemv),
            Ok("gemv-only") => Ok(PdlScope::GemvOnly),
            Ok("gemv-merge") => Ok(PdlScope::GemvAndMerge),
            Ok("gemv-attention") => Ok(PdlScope::GemvAndAttention),
            Ok(other) => Err(super::CudaError::Config(format!(
                "PAGEDSERVE_PDL is off, all, but-gemv, gemv-only, gemv-merge or gemv-attention, not {other:?}"
            ))),
        }
    }

    /// What `serve` uses on sm_90. Only the GEMV overlaps its predecessor: decode steps with
    /// graphs on an H200 (BENCHMARKS.md, session 9) took 4.86 ms at the Llama-3.1-8B shape with
    /// this scope, 4.91 with none and 5.61 with every kernel; at SmolLM2's, 0.73, 0.79 and 0.72.
    /// Adding the split merge (session 14) took the 8B bf16 batch-1 step to 5.41 ms against 4.85,
    /// Q4_K's to 2.52 against 2.45; adding the decode attention too, 4.90 and 2.48.
    pub const DEFAULT: PdlScope = PdlScope::GemvOnly;
}

/// Which o-projections take a one-token split decode attention's merge into their GEMV's staging
/// (`GemvInput::Merge`): every block of the GEMV redoes the merge (the 8B shape: 32 heads of up to
/// 33 splits) while its first weight chunks are in flight, and the `attention_reduce` launch is
/// gone. GGUF blocks took it first (session 15, H200: Q4_K 2.380 -> 2.322 ms a step), when a bf16
/// one-row step lost 0.18 ms with it. The GEMV has streamed through its ring since (session 18),
/// and on an H100 (session 38) every format gains: the 8B one-row step took 5.556 and 5.558 ms
/// against 5.622 and 5.628 (bf16) and 3.664 and 3.656 against 3.698 and 3.717 (FP8); one client
/// served, 5.44 ms TPOT against 5.55 and, on a second machine, 5.46 against 5.52 (bf16), 3.56
/// against 3.60 (FP8). The H200 has not run it since session 15 (BENCHMARKS.md, session 38).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedMerge {
    /// Every merge is `attention_reduce`'s.
    Off,
    /// Only GGUF o-projections fuse it (the default before session 38).
    Ggml,
    /// Every o-projection's GEMV fuses it.
    All,
}

impl FusedMerge {
    /// `All`, or `$PAGEDSERVE_FUSED_MERGE`: `off` (or `0`), `ggml`, `all` (or `on`, `1`).
    pub fn from_env() -> Result<Self, super::CudaError> {
        match std::env::var("PAGEDSERVE_FUSED_MERGE").as_deref() {
            Err(_) | Ok("all" | "on" | "1") => Ok(FusedMerge::All),
            Ok("off" | "0") => Ok(FusedMerge::Off),
            Ok("ggml") => Ok(FusedMerge::Ggml),
            Ok(other) => Err(super::CudaError::Config(format!("PAGEDSERVE_FUSED_MERGE is off, ggml or all, not {other:?}"))),
        }
    }

    /// Whether an o-projection in GGUF blocks (`ggml`) or not takes the merge.
    pub fn takes(self, ggml: bool) -> bool {
        match self {
            FusedMerge::Off => false,
            FusedMerge::Ggml => ggml,
            FusedMerge::All => true,
        }
    }
}

/// Which bf16 products of 2-64 rows go through cuBLAS as K slices into float32 partials that the
/// residual add and norm consuming them sums (`gemm::split_k_partials`, `launch::split_k_splits`),
/// instead of one product whose split, where cuBLAS makes one, needs a reduce launch of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitK {
    Off = 0,
    /// The shapes where two slices measured faster (`launch::split_k_splits`).
    Auto = 1,
    /// Every product the partials scratch holds, in two slices (for `check`).
    Every = 2,
    /// `Auto`'s shapes and the QKV product's (N between K and 2K), whose partials the decode
    /// attention with RoPE fused sums as it reads them. Meant for the H200, where cuBLAS's 8B QKV
    /// product at 32 rows fills 96 of 132 multiprocessors; on an H100 the 8B graph step took 0.9%
    /// longer at 32 rows and 2.0% at 64, and 32 served clients 0.7% fewer tokens a second
    /// (BENCHMARKS.md, session 40), so it is not the default.
    Qkv = 3,
    /// Every product of at least 4096 by 4096 whose N is at most 2K, at any of 2-64 rows: the
    /// QKV, o and down projections, each of which the next kernel sums (the o projection past 16
    /// rows too), and not the gate-up projection, whose partials would need a sum launch before
    /// the activation. Meant for the H200, whose cuBLAS products of 32 rows cover too few
    /// multiprocessors to reach its copy rate (BENCHMARKS.md, session 23); on an H100 the 8B graph
    /// step took 0.5-0.7% longer at 32 rows (1.0% with four slices; session 41).
    Narrow = 4,
}

impl SplitK {
    /// `$PAGEDSERVE_SPLIT_K`: `auto` (the default), `off` (or `0`, which exists to measure it),
    /// `qkv`, `narrow`, `every`. On an H100 `auto` took the 8B graph step 2.6% shorter at 8 and 16 rows and 1.3%
    /// at 32 and 64 (BENCHMARKS.md, session 30).
    pub fn from_env() -> Result<Self, super::CudaError> {
        match std::env::var("PAGEDSERVE_SPLIT_K").as_deref() {
            Ok("off" | "0") => Ok(SplitK::Off),
            Err(_) | Ok("auto" | "on" | "1") => Ok(SplitK::Auto),
            Ok("every") => Ok(SplitK::Every),
            Ok("qkv") => Ok(SplitK::Qkv),
            Ok("narrow") => Ok(SplitK::Narrow),
            Ok(other) => Err(super::CudaError::Config(format!("PAGEDSERVE_SPLIT_K is off, auto, qkv, narrow or every, not {other:?}"))),
        }
    }
}

/// `$PAGEDSERVE_SPLIT_K_SLICES`: how many K slices a split product is cut into, 2 (the default,
/// `launch::SPLIT_K_SLICES`) to `launch::SPLIT_K_MAX_SLICES`. More slices put more blocks on the
/// GPU for the same product, for a card with more bandwidth per multiprocessor (the H200), at the
/// cost of more float32 partials for the consumer to read.
fn split_k_slices_from_env() -> Result<usize, super::CudaError> {
    use super::launch::{SPLIT_K_MAX_SLICES, SPLIT_K_SLICES};
    match std::env::var("PAGEDSERVE_SPLIT_K_SLICES") {
        Err(_) => Ok(SPLIT_K_SLICES),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if (2..=SPLIT_K_MAX_SLICES).contains(&n) => Ok(n),
            _ => Err(super::CudaError::Config(format!("PAGEDSERVE_SPLIT_K_SLICES is a number from 2 to {SPLIT_K_MAX_SLICES}, not {v:?}"))),
        },
    }
}

/// Head dimensions the attention kernels are instantiated for.
pub const DECODE_HEAD_DIMS: [usize; 3] = [64, 128, 256];

impl GpuDevice {
    pub fn new(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        if !super::is_available() {
            return Err(CudaError::Unavailable(
                "no CUDA driver or no GPU found (is libcuda.so on the library path?)".into(),
            ));
        }
        let context = CudaContext::new(ordinal)?;
        // One stream for everything, so no cross-stream events are needed; not the legacy
        // default stream, which CUDA graphs cannot capture.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        // cuBLAS gets its workspace up front: it must not allocate inside a graph capture.
        let workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)?;
        let (workspace_ptr, _) = cudarc::driver::DevicePtr::device_ptr(&workspace, &stream);
        let fp8_gemm = Fp8Gemm::new(workspace_ptr, CUBLAS_WORKSPACE_BYTES)?;
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace_ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
            .result()?;
        }
        let (major, minor) = context.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        if major < 8 {
            // The attention kernels use bf16 tensor-core MMAs, ldmatrix and cp.async (sm_80 on).
            return Err(CudaError::Unavailable(format!(
                "{} is {arch}; pagedserve's CUDA kernels need sm_80 (Ampere) or newer",
                context.name()?
            )));
        }
        let num_sms = context
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let kernels = Kernels::load(&context, &arch)?;
        // The decode attention kernels take more than the 48 KiB of dynamic shared memory a kernel
        // gets without opting in; how many of their blocks then fit on a multiprocessor sizes split-K.
        let mut decode_blocks_per_sm = Vec::new();
        let opt_in = context.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        // (The FP8 cache's kernels take about the same shared memory and registers as the bf16
        // ones, `launch::decode_shared_bytes`: the bf16 kernel's count sizes split-K for both.)
        // A kernel that needs more than a block may take here (head dim 256 on sm_86 and sm_89,
        // 99 KB a block) is left alone: models of that head dim are refused when their backend
        // is made (`attention_fits`), not every model at start.
        for head_dim in DECODE_HEAD_DIMS {
            for cache in [KvCacheDtype::Auto, KvCacheDtype::Fp8E4M3] {
                let (function, shared) = (kernels.get(&decode_kernel_name(head_dim, cache)), decode_shared_bytes(head_dim, cache));
                if shared <= opt_in {
                    function.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
                    if cache == KvCacheDtype::Auto {
                        let blocks = function.occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, shared, None)?;
                        decode_blocks_per_sm.push((head_dim, blocks.max(1) as usize));
                    }
                }
                let (function, shared) = (kernels.get(&prefill_kernel_name(head_dim, cache)), prefill_shared_bytes(head_dim, cache));
                if shared <= opt_in {
                    function.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
                }
            }
        }
        // The GEMV stages up to 96 KB of input rows per block (200 KB from ggml blocks), where the
        // device allows it.
        for (name, format) in gemv_kernels() {
            let shared = gemv_dynamic_shared_limit(format, opt_in);
            kernels.get(&name).set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
        }
        for name in GGML_ONE_ROW_WARP_KERNELS {
            let shared = gemv_dynamic_shared_limit(WeightFormat::Ggml(crate::model::gguf::GgmlType::Q4_K), opt_in);
            kernels.get(name).set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
        }
        // MMQ's ring takes up to 112 KB (Q8_0, 64 rows); where the device allows less (sm_86: 99
        // KB), those products take the tiles instead (`gemm::ggml_linear`).
        for m in [16, 32, 64] {
            for ty in WeightFormat::KEPT_GGML.into_iter().filter(|&ty| mmq_supports(ty, m, 256) && mmq_shared_bytes(ty, m) <= opt_in) {
                kernels.get(&mmq_kernel_name(ty, m)).set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, mmq_shared_bytes(ty, m) as i32)?;
            }
        }
        // The skinny products' blocks take ~195 KB (sm_80 and sm_90 have it; sm_86 and sm_89 do not).
        let skinny = match Skinny::rows_from_env()? {
            Some(rows) if skinny::TILES.iter().all(|&t| skinny::shared_bytes(t) <= opt_in) => {
                for tiles in skinny::TILES {
                    for silu in [false, true] {
                        kernels
                            .get(&skinny::kernel_name(tiles, silu))
                            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, skinny::shared_bytes(tiles) as i32)?;
                    }
                }
                Some(Skinny::new(&stream, rows)?)
            }
            _ => None,
        };
        let greedy_chunks = !matches!(std::env::var("PAGEDSERVE_GREEDY_CHUNKS").as_deref(), Ok("off" | "0"));
        let name = context.name()?;
        let pdl = if major >= 9 { PdlScope::from_env()? } else { PdlScope::Off };
        let fused_rope = !matches!(std::env::var("PAGEDSERVE_FUSED_ROPE").as_deref(), Ok("off" | "0"));
        let fused_merge = FusedMerge::from_env()?;
        let l2_bytes = context.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize;
        // The memory's peak rate from its clock (kHz, double data rate) and bus width (bits), for
        // the log and `bench gpu`: 0 where the driver does not say (nothing depends on it).
        let attribute = |a| context.attribute(a).map_or(0.0, |v| v.max(0) as f64);
        let memory_khz = attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
        let bus_bits = attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
        let peak_memory_gbps = memory_khz * 1e3 * 2.0 * bus_bits / 8.0 / 1e9;
        let l2_prefetch_limit = match std::env::var("PAGEDSERVE_L2_PREFETCH").as_deref() {
            _ if major < 9 => 0,
            Ok("off" | "0") => 0,
            Ok(mb) => match mb.parse::<usize>() {
                Ok(mb) => mb << 20,
                Err(_) => return Err(CudaError::Config(format!("PAGEDSERVE_L2_PREFETCH={mb}: expected off or a number of MB"))),
            },
            Err(_) => l2_bytes / 4 * 3,
        };
        let tuned_gemm = match TunedGemm::rows_from_env()? {
            Some(rows) => Some((rows, Mutex::new(TunedGemm::new(workspace_ptr, CUBLAS_WORKSPACE_BYTES, l2_bytes, TunedGemm::candidates_from_env()?)?))),
            None => None,
        };
        let kv_evict_first = !matches!(std::env::var("PAGEDSERVE_KV_EVICT_FIRST").as_deref(), Ok("off" | "0"));
        let split_k = SplitK::from_env()?;
        let split_k_slices = split_k_slices_from_env()?;
        let graph_tiers = !matches!(std::env::var("PAGEDSERVE_GRAPH_TIERS").as_deref(), Ok("off" | "0"));
        tracing::info!(gpu = %name, %arch, num_sms, peak_memory_gbps = peak_memory_gbps.round(), ?pdl, skinny_rows = ?skinny.as_ref().map(|s| s.rows.clone()), blas_tune_rows = ?tuned_gemm.as_ref().map(|(rows, _)| rows.clone()), greedy_chunks, fused_rope, ?fused_merge, l2_bytes, l2_prefetch_limit, kv_evict_first, graph_tiers, ?split_k, split_k_slices, "CUDA device ready");
        Ok(Arc::new(GpuDevice {
            context,
            stream,
            blas,
            _blas_workspace: workspace,
            kernels,
            name,
            arch,
            num_sms,
            peak_memory_gbps,
            max_shared_optin: opt_in,
            decode_blocks_per_sm,
            pdl: AtomicU8::new(pdl as u8),
            fused_rope,
            fused_merge,
            l2_prefetch_limit,
            kv_evict_first,
            graph_tiers,
            split_k: AtomicU8::new(split_k as u8),
            split_k_slices: AtomicU8::new(split_k_slices as u8),
            gemv_occupancy: Mutex::new(HashMap::new()),
            fp8_gemm: Mutex::new(fp8_gemm),
            tuned_gemm,
            greedy_chunks,
            skinny,
        }))
    }

    /// Whether the attention kernels of `head_dim` over a `cache` cache fit the shared memory a
    /// block may take on this device (head dim 256 does not on sm_86 and sm_89).
    pub fn attention_fits(&self, head_dim: usize, cache: KvCacheDtype) -> bool {
        attention_shared_bytes(head_dim, cache) <= self.max_shared_optin
    }

    /// Decode attention blocks of this head dimension that run at once on the whole GPU (the
    /// `slots` of `AttentionSplit::plan`).
    pub fn decode_slots(&self, head_dim: usize) -> usize {
        let per_sm = self.decode_blocks_per_sm.iter().find(|&&(hd, _)| hd == head_dim).map_or(1, |&(_, b)| b);
        per_sm * self.num_sms
    }

    /// Whether any launch overlaps the previous kernel's tail (programmatic dependent launch).
    /// Every kernel waits for its predecessor before it touches anything but weights, so this
    /// changes timing only, never results.
    pub fn pdl(&self) -> bool {
        self.pdl_scope() != PdlScope::Off
    }

    pub fn pdl_scope(&self) -> PdlScope {
        match self.pdl.load(Ordering::Relaxed) {
            1 => PdlScope::All,
            2 => PdlScope::AllButGemv,
            3 => PdlScope::GemvOnly,
            4 => PdlScope::GemvAndMerge,
            5 => PdlScope::GemvAndAttention,
            _ => PdlScope::Off,
        }
    }

    /// Whether kernel `name` is launched as a programmatic dependent.
    pub fn pdl_for(&self, name: &str) -> bool {
        match self.pdl_scope() {
            PdlScope::Off => false,
            PdlScope::All => true,
            PdlScope::AllButGemv => !name.starts_with("gemv"),
            PdlScope::GemvOnly => name.starts_with("gemv"),
            PdlScope::GemvAndMerge => name.starts_with("gemv") || name.starts_with("attention_reduce"),
            PdlScope::GemvAndAttention => name.starts_with("gemv") || name.starts_with("attention_reduce") || name.starts_with("paged_attention"),
        }
    }

    /// Turns programmatic dependent launches on (for every kernel) or off.
    pub fn set_pdl(&self, on: bool) {
        self.set_pdl_scope(if on { PdlScope::All } else { PdlScope::Off });
    }

    pub fn split_k(&self) -> SplitK {
        match self.split_k.load(Ordering::Relaxed) {
            0 => SplitK::Off,
            1 => SplitK::Auto,
            2 => SplitK::Every,
            3 => SplitK::Qkv,
            _ => SplitK::Narrow,
        }
    }

    /// Sets which products split K (`check` forces `Every` on shapes `Auto` leaves alone).
    pub fn set_split_k(&self, mode: SplitK) {
        self.split_k.store(mode as u8, Ordering::Relaxed);
    }

    /// Into how many K slices a split product is cut.
    pub fn split_k_slices(&self) -> usize {
        self.split_k_slices.load(Ordering::Relaxed) as usize
    }

    /// Sets the slices of a split product (`check` runs the split forward with the most).
    pub fn set_split_k_slices(&self, slices: usize) {
        debug_assert!((2..=super::launch::SPLIT_K_MAX_SLICES).contains(&slices));
        self.split_k_slices.store(slices as u8, Ordering::Relaxed);
    }

    /// The compute capability as a number: 90 for sm_90.
    pub fn compute_capability(&self) -> u32 {
        self.arch
            .trim_start_matches("sm_")
            .parse::<u32>()
            .unwrap_or(0)
    }

    /// Whether this GPU has programmatic dependent launch (sm_90 on).
    pub fn pdl_supported(&self) -> bool {
        self.compute_capability() >= 90
    }

    /// Chooses which kernels are launched as programmatic dependents (`bench gpu` compares them);
    /// always `Off` before sm_90, where the kernels have no `griddepcontrol`.
    pub fn set_pdl_scope(&self, scope: PdlScope) {
        let scope = if self.pdl_supported() { scope } else { PdlScope::Off };
        self.pdl.store(scope as u8, Ordering::Relaxed);
    }

    /// How many blocks of GEMV kernel `name` of `threads` threads with `shared` bytes of dynamic
    /// shared memory are resident on one multiprocessor (asked once, then remembered).
    pub fn gemv_blocks_per_sm(&self, name: &str, threads: u32, shared: usize) -> Result<usize, super::CudaError> {
        let key = (name.to_string(), threads, shared);
        let mut known = self.gemv_occupancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&blocks) = known.get(&key) {
            return Ok(blocks);
        }
        let blocks = self.function(name).occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)?.max(1) as usize;
        known.insert(key, blocks);
        Ok(blocks)
    }

    /// The cuBLASLt state of the FP8 GEMMs.
    pub(crate) fn fp8_gemm(&self) -> std::sync::MutexGuard<'_, Fp8Gemm> {
        self.fp8_gemm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The row counts of the timed cuBLASLt path (`cuda::tuned_gemm`), if it is on.
    pub fn tuned_gemm_rows(&self) -> Option<std::ops::RangeInclusive<usize>> {
        self.tuned_gemm.as_ref().map(|(rows, _)| rows.clone())
    }

    /// The timed cuBLASLt path's state, if it is on.
    pub(crate) fn tuned_gemm(&self) -> Option<std::sync::MutexGuard<'_, TunedGemm>> {
        self.tuned_gemm.as_ref().map(|(_, tuned)| tuned.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn function(&self, name: &str) -> &CudaFunction {
        self.kernels.get(name)
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.context.mem_get_info()?)
    }
}

#[cfg(test)]
mod tests {
    use super::FusedMerge;

    #[test]
    fn fused_merge_takes_ggml_o_projections_only_under_ggml() {
        for ggml in [false, true] {
            assert!(!FusedMerge::Off.takes(ggml));
            assert!(FusedMerge::All.takes(ggml));
            assert_eq!(FusedMerge::Ggml.takes(ggml), ggml);
        }
    }
}
