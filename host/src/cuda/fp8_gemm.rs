//! FP8 products of many rows through cuBLASLt: `out[m×n] = x[m×k] · Wᵀ` with W in E4M3 with a
//! scale per row (`model::fp8`) and x bf16. The input is quantized first, per token, to E4M3
//! with its own scale (`fp8_quantize_rows`), so the GEMM runs on Hopper's FP8 tensor cores
//! (twice bf16's rate, and half the weight bytes), and the result is `Σ xq·wq · sx[i] · sw[j]`.
//!
//! By default the GEMM runs unscaled and the per-row and per-token scales are applied after it:
//! by the kernel that reads the output next where the forward can fold them in
//! (`fp8_linear_leaving_scales`), else by `scale_output`, one more pass over the output.
//! cuBLASLt can apply both vectors itself (its outer-vector scaling, cuBLAS 12.9 on Hopper), and
//! `PAGEDSERVE_FP8_OUTER_SCALES=1` asks for it (falling back when the first heuristic query finds
//! no kernel); on an H200 with cuBLAS 13 those kernels were slower: the 8B shape served 5,101
//! tok/s at 32 clients against 5,745 and 12,644 against 12,849 at 1000 requests (BENCHMARKS.md,
//! session 10).
//!
//! Everything is capturable in a CUDA graph: the plans (descriptors and the chosen algorithm,
//! per shape) are host objects made before the first launch of a shape, the workspace is the
//! device's preallocated cuBLAS workspace (the two libraries share the one stream).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::blaslt::{set_desc, Handle, Plan};
use super::launch::row_threads;
use super::launchers;
use super::{CudaError, GpuDevice};

/// A cuBLASLt handle and the plans made with it.
pub struct Fp8Gemm {
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    plans: HashMap<(usize, usize, usize), Plan>,
    /// Whether the GEMM applies the scale vectors (outer-vector scaling); `None` until asked.
    outer_vector_scales: Option<bool>,
    /// Hopper's fast FP8 accumulation (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`; `PAGEDSERVE_FP8_FAST_ACCUM=0`
    /// turns it off): the tensor cores' partial sums are not promoted to float32 every few K
    /// steps. On, as vLLM's own Hopper FP8 GEMMs run (every CUTLASS schedule of its sm90 FP8
    /// dispatch is an `FP8FastAccum` one): on the H200 (8B shape) it saved 1.3-1.4% of a decode
    /// step at 64 and 256 rows, and the GEMM's error against the CPU went from 2.3e-3 to 2.9e-3
    /// at K = 14336 (BENCHMARKS.md, session 16), a tenth of what the E4M3 weights themselves
    /// move the forward (`check`'s FP8 rows: 2.5e-2).
    fast_accumulation: bool,
    /// Last: dropped after the plans made with it.
    handle: Handle,
}

impl Fp8Gemm {
    /// A handle using `workspace_bytes` of device memory at `workspace` (which must outlive it).
    pub fn new(workspace: CUdeviceptr, workspace_bytes: usize) -> Result<Self, CudaError> {
        Ok(Fp8Gemm {
            handle: Handle::new()?,
            workspace,
            workspace_bytes,
            plans: HashMap::new(),
            // `None` probes outer-vector scaling on the first product.
            outer_vector_scales: if std::env::var("PAGEDSERVE_FP8_OUTER_SCALES").is_ok_and(|v| v == "1") { None } else { Some(false) },
            fast_accumulation: !std::env::var("PAGEDSERVE_FP8_FAST_ACCUM").is_ok_and(|v| v == "0"),
        })
    }

    /// Whether the GEMM applies the scales itself (known after the first product).
    pub fn outer_vector_scales(&self) -> Option<bool> {
        self.outer_vector_scales
    }

    /// Makes the plan of `(m, n, k)`, with outer-vector scales or without.
    /// With `outer`, the scale vectors' addresses of the first product of the shape go into the
    /// descriptor before the heuristic query (later products set their own).
    fn make_plan(&self, m: usize, n: usize, k: usize, outer: Option<(CUdeviceptr, CUdeviceptr)>) -> Result<Plan, CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let mut plan = Plan::new(sys::cudaDataType::CUDA_R_8F_E4M3, sys::cudaDataType::CUDA_R_8F_E4M3, sys::cudaDataType::CUDA_R_16BF, m, n, k, n)?;
        let desc = plan.desc;
        // SAFETY: the descriptor is live; every value is of its attribute's type.
        unsafe {
            if self.fast_accumulation {
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            if let Some((a_scales, b_scales)) = outer {
                let mode = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &(a_scales as *const c_void))?;
                set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &(b_scales as *const c_void))?;
            }
        }
        plan.algo = plan.candidates(self.handle.raw(), self.workspace_bytes, 256, 1).map_err(|e| CudaError::Config(format!("m {m} n {n} k {k}: {e}")))?[0];
        Ok(plan)
    }

    /// The plan of `(m, n, k)`, made on first use; the first one decides the scaling.
    /// `scales`: the weight's and the input's scale vectors of this product.
    fn plan(&mut self, m: usize, n: usize, k: usize, scales: (CUdeviceptr, CUdeviceptr)) -> Result<(&Plan, bool), CudaError> {
        if !self.plans.contains_key(&(m, n, k)) {
            let plan = match self.outer_vector_scales {
                Some(outer) => self.make_plan(m, n, k, outer.then_some(scales))?,
                None => match self.make_plan(m, n, k, Some(scales)) {
                    Ok(plan) => {
                        self.outer_vector_scales = Some(true);
                        plan
                    }
                    Err(e) => {
                        tracing::info!("cuBLASLt has no FP8 GEMM with per-row and per-column scales here ({e}); they are applied after it");
                        self.outer_vector_scales = Some(false);
                        self.make_plan(m, n, k, None)?
                    }
                },
            };
            self.plans.insert((m, n, k), plan);
        }
        Ok((&self.plans[&(m, n, k)], self.outer_vector_scales == Some(true)))
    }
}

/// The operands of one FP8 product (device pointers).
#[derive(Debug, Clone, Copy)]
pub struct Fp8Product {
    /// bf16 `[m, n]`.
    pub out: CUdeviceptr,
    /// bf16 `[m, k]`.
    pub input: CUdeviceptr,
    /// E4M3 `[n, k]` and float32 `[n]`.
    pub weight: CUdeviceptr,
    pub weight_scales: CUdeviceptr,
    /// Room for the quantized input, `[m, k]` bytes, and its scales, `[m]` floats.
    pub input_fp8: CUdeviceptr,
    pub input_scales: CUdeviceptr,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Enqueues the product: the input's quantization, the GEMM and, without outer-vector scaling,
/// the scales' pass.
///
/// # Safety
/// Every pointer must be a live device allocation of the size its field documents, on `dev`'s
/// stream, 16-byte aligned; `out` must not overlap the inputs.
pub unsafe fn fp8_linear(dev: &GpuDevice, p: &Fp8Product) -> Result<(), CudaError> {
    match fp8_linear_leaving_scales(dev, p)? {
        Some(scales) => scale_output(dev, p.out, scales, p.m, p.n),
        None => Ok(()),
    }
}

/// Multiplies element `[i, j]` of the bf16 `[m, n]` product at `out` by `rows[i] * cols[j]`, in
/// place (`fp8_scale_output`, one block a row): the scales `fp8_linear_leaving_scales` left.
///
/// # Safety
/// `out` must hold `m` rows of `n` bf16 values and the scales `m` and `n` floats, on `dev`'s
/// stream.
pub unsafe fn scale_output(dev: &GpuDevice, out: CUdeviceptr, (rows, cols): (CUdeviceptr, CUdeviceptr), m: usize, n: usize) -> Result<(), CudaError> {
    let config = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (row_threads(n), 1, 1), shared_mem_bytes: 0 };
    launchers::fp8_scale_output(dev, config, out, rows, cols, n as i32)
}

/// As `fp8_linear`, but without the scales' pass: where the GEMM did not apply the scales itself,
/// `out` holds the unscaled products and the answer is the (per-token, per-output-row) scale
/// vectors, `[m]` and `[n]` floats, to multiply element `[i, j]` by. The forward folds them into
/// the kernel that reads `out` next (`fused_add_rmsnorm`, the gated activations) and saves a
/// pass over it. The per-token scales live in `input_scales`, which the next FP8 product
/// overwrites: they must be applied before it.
///
/// # Safety
/// As for `fp8_linear`.
pub unsafe fn fp8_linear_leaving_scales(dev: &GpuDevice, p: &Fp8Product) -> Result<Option<(CUdeviceptr, CUdeviceptr)>, CudaError> {
    if p.m == 0 {
        return Ok(None);
    }
    if !p.k.is_multiple_of(16) || !p.n.is_multiple_of(16) {
        return Err(CudaError::Config(format!("cuBLASLt's FP8 GEMM takes K and N multiples of 16, not {} and {}", p.k, p.n)));
    }
    let rows = |width: usize| LaunchConfig { grid_dim: (p.m as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 };
    launchers::fp8_quantize_rows(dev, rows(p.k / 2), p.input_fp8, p.input_scales, p.input, p.k as i32)?;
    let mut gemm = dev.fp8_gemm();
    let workspace = (gemm.workspace, gemm.workspace_bytes);
    let handle = gemm.handle.raw();
    let (plan, outer) = gemm.plan(p.m, p.n, p.k, (p.weight_scales, p.input_scales))?;
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    if outer {
        set_desc(plan.desc, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &(p.weight_scales as *const c_void))?;
        set_desc(plan.desc, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &(p.input_scales as *const c_void))?;
    }
    let (alpha, beta) = (1.0f32, 0.0f32);
    lt::matmul(
        handle,
        plan.desc,
        (&alpha as *const f32).cast(),
        (&beta as *const f32).cast(),
        p.weight as *const c_void,
        plan.a,
        p.input_fp8 as *const c_void,
        plan.b,
        p.out as *const c_void,
        plan.d,
        p.out as *mut c_void,
        plan.d,
        &plan.algo,
        workspace.0 as *mut c_void,
        workspace.1,
        dev.stream.cu_stream() as _,
    )?;
    drop(gemm);
    Ok((!outer).then_some((p.input_scales, p.weight_scales)))
}
