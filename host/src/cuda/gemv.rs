//! The small-M linear layer (`kernels/gemv.cu`): `out[m×n] = input[m×k] · wᵀ (+ bias)` for
//! m ≤ 8, a single weight stream at full bandwidth where cuBLAS is slow; bf16 weights, FP8 (E4M3
//! with a scale per row) at half the bytes, or GGUF blocks kept quantized (`kernels/ggml.cu`,
//! with the input quantized to int8 per 32 values). Its input staging can
//! also compute the element-wise step before the product (SiLU-and-multiply, or the residual
//! add and RMSNorm), which saves a launch and a round trip through memory at batch 1–8.
//!
//! Everything here is capturable in a CUDA graph: one kernel launch, no allocation, no host
//! synchronisation.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::gemm::OutType;
use super::launch::{ggml_one_row_warps, gemv_block_fit, gemv_block_warps, gemv_grid, gemv_kernel_name, gemv_supports, GemvMode, WeightFormat};
use super::launchers;
use crate::model::gguf::GgmlType;
use super::{CudaError, GpuDevice};

/// Where the GEMV's input rows come from (device pointers; 0 is "none" where optional).
#[derive(Debug, Clone, Copy)]
pub enum GemvInput {
    /// A bf16 `[m, k]` matrix, 16-byte aligned.
    Plain(CUdeviceptr),
    /// The bf16 gate_up buffer `[m, 2k]`; the input is `silu(gate) · up`, rounded to bf16 as
    /// `silu_and_mul` rounds it.
    SiluMul(CUdeviceptr),
    /// The float32 residual stream: row `r` of the input is
    /// `rmsnorm(residual[row] + delta[row]) · weight` (as `fused_add_rmsnorm`), with `row =
    /// rows[r]` when `rows` is given, else `r`. When `residual_out` is given, one block writes
    /// `residual + delta` there (same row); it must not be `residual` itself, which every block
    /// reads during the launch.
    AddNorm { residual: CUdeviceptr, delta: CUdeviceptr, weight: CUdeviceptr, residual_out: CUdeviceptr, rows: CUdeviceptr, eps: f32 },
    /// The decode attention's split-K partials of one token (`m` = 1; `cuda::attention`'s
    /// layout): the input is their merge, rounded to bf16 as `attention_reduce` writes it, which
    /// is then not launched. `k` is the heads times `head_dim`.
    Merge { part_out: CUdeviceptr, part_max: CUdeviceptr, part_sum: CUdeviceptr, splits: usize, head_dim: usize },
}

impl GemvInput {
    fn mode(&self) -> GemvMode {
        match self {
            GemvInput::Plain(_) => GemvMode::Plain,
            GemvInput::SiluMul(_) => GemvMode::SiluMul,
            GemvInput::AddNorm { .. } => GemvMode::AddNorm,
            GemvInput::Merge { .. } => GemvMode::Merge,
        }
    }
}

/// The `[n, k]` weight of a GEMV (device pointers, the values 16-byte aligned).
#[derive(Debug, Clone, Copy)]
pub enum GemvWeight {
    Bf16(CUdeviceptr),
    /// E4M3 values and a float32 scale per row.
    Fp8 { values: CUdeviceptr, scales: CUdeviceptr },
    /// GGUF blocks of a kept type (`WeightFormat::KEPT_GGML`), row after row.
    Ggml { ty: GgmlType, blocks: CUdeviceptr },
}

impl GemvWeight {
    pub fn format(&self) -> WeightFormat {
        match self {
            GemvWeight::Bf16(_) => WeightFormat::Bf16,
            GemvWeight::Fp8 { .. } => WeightFormat::Fp8,
            GemvWeight::Ggml { ty, .. } => WeightFormat::Ggml(*ty),
        }
    }

    /// The values and the scales (0 for bf16).
    fn pointers(&self) -> (CUdeviceptr, CUdeviceptr) {
        match *self {
            GemvWeight::Bf16(values) | GemvWeight::Ggml { blocks: values, .. } => (values, 0),
            GemvWeight::Fp8 { values, scales } => (values, scales),
        }
    }
}

/// One small-M linear layer.
#[derive(Debug, Clone, Copy)]
pub struct Gemv {
    pub out: CUdeviceptr,
    pub out_type: OutType,
    pub input: GemvInput,
    pub w: GemvWeight,
    /// A float32 `[n]` bias added before rounding, or 0.
    pub bias: CUdeviceptr,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Enqueues the GEMV on `dev`'s stream; refuses shapes the kernel does not take (see
/// `launch::gemv_supports`) and unaligned vector operands.
///
/// # Safety
/// Every pointer must be a live device allocation of the size its field documents, on `dev`'s
/// stream; `out` must not overlap the inputs.
pub unsafe fn gemv(dev: &GpuDevice, g: &Gemv) -> Result<(), CudaError> {
    let format = g.w.format();
    if !gemv_supports(g.m, g.k, format) || g.n == 0 {
        return Err(CudaError::Config(format!("the GEMV does not take m {} k {} n {}", g.m, g.k, g.n)));
    }
    let null: CUdeviceptr = 0;
    if !super::launch::gemv_mode_rows(g.input.mode()).contains(&super::launch::gemv_padded_rows(g.m)) {
        return Err(CudaError::Config(format!("the GEMV's {:?} staging does not take {} rows", g.input.mode(), g.m)));
    }
    // The kernels share one signature: the merge's maxima and sums go where the norm's weight
    // and residual output do (`kernels/gemv.cu`, GEMV_MERGE).
    let (mut splits, mut head_dim) = (0i32, 0i32);
    let (x, delta, weight, residual_out, rows, eps) = match g.input {
        GemvInput::Plain(x) | GemvInput::SiluMul(x) => (x, null, null, null, null, 0.0f32),
        GemvInput::AddNorm { residual, delta, weight, residual_out, rows, eps } => (residual, delta, weight, residual_out, rows, eps),
        GemvInput::Merge { part_out, part_max, part_sum, splits: s, head_dim: hd } => {
            if hd == 0 || !hd.is_multiple_of(8) || !g.k.is_multiple_of(hd) || s == 0 {
                return Err(CudaError::Config(format!("merging {s} splits of heads of {hd} into {} values", g.k)));
            }
            (splits, head_dim) = (s as i32, hd as i32);
            (part_out, null, part_max, part_sum, null, 0.0f32)
        }
    };
    // The staging reads 16-byte vectors of x (float4 of the residual), the norm weight and the
    // residual it writes back, and pairs of delta values.
    let (w, w_scale) = g.w.pointers();
    if !(x | w | weight | residual_out).is_multiple_of(16) || !delta.is_multiple_of(4) {
        return Err(CudaError::Config("the GEMV needs 16-byte aligned input, weight, norm weight and residual, and 4-byte aligned delta".into()));
    }
    let out_f32 = i32::from(g.out_type == OutType::F32);
    let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
    // Warps stream `rows_per_warp` output rows at a time: size the grid in those.
    let mut row_groups = g.n.div_ceil(format.rows_per_warp());
    let wanted = gemv_block_warps(row_groups, dev.num_sms);
    let (warps, shared) = gemv_block_fit(g.m, g.k, format, wanted, dev.max_shared_optin)
        .ok_or_else(|| CudaError::Config(format!("a GEMV block of m {} k {} does not fit in this device's shared memory", g.m, g.k)))?;
    let blocks_per_sm = dev.gemv_blocks_per_sm(&gemv_kernel_name(g.input.mode(), g.m, format), warps * 32, shared)?;
    let one_row_warps = format == WeightFormat::Ggml(GgmlType::Q4_K)
        && !matches!(std::env::var("PAGEDSERVE_GGML_R1").as_deref(), Ok("off"))
        && g.m == 1
        && g.input.mode() != GemvMode::Merge
        && ggml_one_row_warps(g.n, warps as usize * blocks_per_sm * dev.num_sms);
    let suffix = if one_row_warps {
        row_groups = g.n;
        "_r1"
    } else {
        ""
    };
    let config = LaunchConfig {
        grid_dim: (gemv_grid(row_groups, warps, dev.num_sms, blocks_per_sm), 1, 1),
        block_dim: (warps * 32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    launchers::gemv(
        dev,
        g.input.mode(),
        g.m,
        format,
        suffix,
        config,
        g.out,
        out_f32,
        x,
        delta,
        weight,
        residual_out,
        rows,
        g.bias,
        w,
        w_scale,
        m,
        n,
        k,
        eps,
        splits,
        head_dim,
    )?;
    Ok(())
}
