//! Linear layers through cuBLAS: `out[m×n] = a[m×k] · wᵀ` with row-major bf16 operands (`w` is a
//! `[n×k]` weight), float32 accumulation, and a bf16 or float32 result. One row goes to our
//! GEMV (`cuda::gemv`: cuBLAS is slow at batch 1), up to 64 to the skinny tensor-core kernel
//! (`cuda::skinny`), more to cuBLAS; `split_k_partials` makes a product as float32 partials over
//! slices of K, for a consumer that sums them (`cuda::forward`). Weights kept in GGUF blocks
//! go to MMQ (`mmq_linear`, the int8 tensor cores) up to 64 rows, else to dequantized tiles.

use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::sys::CUdeviceptr;

use super::gemv::{gemv, Gemv, GemvInput, GemvWeight};
use super::skinny;
use super::tuned_gemm;
use super::launch::{gemv_prefers, grid_stride_config, mmq_input_bytes, mmq_quantize_config, mmq_plan, mmq_shared_bytes, mmq_supports, mmq_threads, mmq_tokens, WeightFormat, MMQ_ROWS};
use super::{CudaError, GpuDevice};
use crate::model::gguf::GgmlType;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OutType {
    Bf16,
    F32,
}

/// The GEMV where it is the faster path (`launch::gemv_prefers`, aligned 16-byte vectors), cuBLAS
/// otherwise.
///
/// # Safety
/// `out`, `a` and `w` must be live device allocations of at least `m*n`, `m*k` and `n*k`
/// elements of their types, on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    a: CUdeviceptr,
    w: CUdeviceptr,
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> {
    if gemv_prefers(m, k, n, WeightFormat::Bf16) && (a | w).is_multiple_of(16) {
        return gemv(dev, &Gemv { out, out_type, input: GemvInput::Plain(a), w: GemvWeight::Bf16(w), bias: 0, m, k, n });
    }
    if skinny::prefers(dev, m, k, n) && (a | w).is_multiple_of(16) {
        return skinny::skinny_linear(dev, out, out_type, skinny::SkinnyInput::Plain(a), w, m, k, n);
    }
    cublas_linear(dev, out, out_type, a, w, m, k, n)
}

/// The same product through cuBLAS, whatever `m` (through cuBLASLt with a timed algorithm for
/// the rows `PAGEDSERVE_BLAS_TUNE` names, `cuda::tuned_gemm`).
///
/// # Safety
/// As for `linear`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn cublas_linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    a: CUdeviceptr,
    w: CUdeviceptr,
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> { cublas_linear_strided(dev, out, n, out_type, a, w, m, k, n) }

/// `cublas_linear` into output rows `ldc` elements apart (a block of columns of a wider output).
///
/// # Safety
/// As for `linear`, with `out` holding `m` rows of `ldc` from its start.
#[allow(clippy::too_many_arguments)]
pub unsafe fn cublas_linear_strided(
    dev: &GpuDevice,
    out: CUdeviceptr,
    ldc: usize,
    out_type: OutType,
    a: CUdeviceptr,
    w: CUdeviceptr,
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> {
    if m == 0 {
        return Ok(());
    }
    if tuned_gemm::takes(dev, m) {
        return tuned_gemm::tuned_linear(dev, out, ldc, out_type, a, w, m, k, n);
    }
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Row-major out[m×n] is column-major outᵀ[n×m] = W · aᵀ, with W column-major [k×n] transposed.
    gemm_ex(
        *dev.blas.handle(),
        cublasOperation_t::CUBLAS_OP_T,
        cublasOperation_t::CUBLAS_OP_N,
        n as i32,
        m as i32,
        k as i32,
        (&alpha) as *const f32 as *const _,
        w as *const _,
        cudaDataType_t::CUDA_R_16BF,
        k as i32,
        a as *const _,
        cudaDataType_t::CUDA_R_16BF,
        k as i32,
        (&beta) as *const f32 as *const _,
        out as *mut _,
        match out_type {
            OutType::Bf16 => cudaDataType_t::CUDA_R_16BF,
            OutType::F32 => cudaDataType_t::CUDA_R_32F,
        },
        ldc as i32,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )?;
    Ok(())
}

/// `out[m×n] = a[m×k] · wᵀ` as `splits` float32 partial products, one per slice of K:
/// `partials[s][m×n] = a[:, s·k/splits ..] · w[:, s·k/splits ..]ᵀ`, in one strided-batched cuBLAS
/// call (`launch::split_k_splits` says where that beats one product; the consumer sums the
/// slices, `fused_add_rmsnorm_partials`). `k` must be a multiple of `splits`.
///
/// # Safety
/// `partials` must hold `splits·m·n` floats, `a` and `w` `m·k` and `n·k` bf16 values, all live
/// on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn split_k_partials(
    dev: &GpuDevice,
    partials: CUdeviceptr,
    a: CUdeviceptr,
    w: CUdeviceptr,
    m: usize,
    k: usize,
    n: usize,
    splits: usize,
) -> Result<(), CudaError> {
    let slice = k / splits;
    let (alpha, beta) = (1.0f32, 0.0f32);
    // As `cublas_linear_strided`: column-major partialᵀ[n×m] = W_s · a_sᵀ, slice s of W and of
    // a starting `slice` values further along their rows (leading dimension still k).
    gemm_strided_batched_ex(
        *dev.blas.handle(),
        cublasOperation_t::CUBLAS_OP_T,
        cublasOperation_t::CUBLAS_OP_N,
        n as i32,
        m as i32,
        slice as i32,
        (&alpha) as *const f32 as *const _,
        w as *const _,
        cudaDataType_t::CUDA_R_16BF,
        k as i32,
        slice as i64,
        a as *const _,
        cudaDataType_t::CUDA_R_16BF,
        k as i32,
        slice as i64,
        (&beta) as *const f32 as *const _,
        partials as *mut _,
        cudaDataType_t::CUDA_R_32F,
        n as i32,
        (m * n) as i64,
        splits as i32,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )?;
    Ok(())
}

/// Elements of the bf16 tile a quantized GGUF weight is dequantized into, a block of rows at a
/// time, for products of more rows than the GEMV takes (64 MB: four tiles for the Llama-3.1-8B
/// gate_up projection).
pub const GGML_TILE_ELEMENTS: usize = 32 << 20;

/// `out[m×n] = a[m×k] · Wᵀ` with W in GGUF blocks of `ty` (`[n, k]`, row after row), for `m`
/// more than the GEMV takes. Up to `MMQ_MAX_ROWS` rows of the types MMQ takes
/// (`launch::mmq_supports`) go to `mmq_linear`, the input quantized into the scratch `tile`.
/// Otherwise blocks of W's rows are dequantized into the bf16 `tile` (`dequant_ggml`,
/// `kernels/ggml.cu`) and multiplied by cuBLAS into their columns of `out`: prefill is compute
/// bound, so the extra pass over the weight (a bf16 write and read of it) costs little there.
///
/// # Safety
/// `out`, `a` and `blocks` must be live device allocations of `m·n` (of `out_type`), `m·k` bf16
/// and `n·k` values in `ty` blocks; `tile` of `tile_elements` bf16 values; all on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn ggml_linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    a: CUdeviceptr,
    (ty, blocks): (GgmlType, CUdeviceptr),
    (tile, tile_elements): (CUdeviceptr, usize),
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> {
    if mmq_runs(dev, ty, m, k, tile_elements) {
        return mmq_linear(dev, out, out_type, a, (ty, blocks), (tile, tile_elements), m, k, n, 2 * dev.num_sms);
    }
    tiled_linear(dev, out, out_type, a, (ty, blocks), (tile, tile_elements), m, k, n)
}

/// `ggml_linear` through dequantized tiles of W and cuBLAS, whatever `m`.
///
/// # Safety
/// As `ggml_linear`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tiled_linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    a: CUdeviceptr,
    (ty, blocks): (GgmlType, CUdeviceptr),
    (tile, tile_elements): (CUdeviceptr, usize),
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> {
    if !k.is_multiple_of(ty.block_size()) || tile_elements < k {
        return Err(CudaError::Config(format!("a {ty:?} product of K {k} with a tile of {tile_elements}")));
    }
    // Whole 64 MB tiles: L2-sized ones (16 MB, more and smaller cuBLAS products) made the 8B Q4_K
    // prefill slower on an H200, TTFT 29.8 against 19.3 ms (BENCHMARKS.md, session 23).
    let rows_per_tile = tile_elements / k;
    let row_bytes = (k / ty.block_size() * ty.type_size()) as u64;
    let out_bytes = if out_type == OutType::F32 { 4 } else { 2 };
    for first in (0..n).step_by(rows_per_tile) {
        let rows = rows_per_tile.min(n - first);
        let config = super::launch::dequant_config(rows, k);
        super::launchers::dequant_ggml(dev, config, tile, blocks + first as u64 * row_bytes, ty as i32, rows as i32, k as i32, 0)?;
        cublas_linear_strided(dev, out + (first * out_bytes) as u64, n, out_type, a, tile, m, k, rows)?;
    }
    Ok(())
}

/// Whether MMQ takes `m` rows of width `k` against `ty` blocks on `dev`, with a scratch of
/// `scratch_elements` bf16 for the quantized input: the type and shape (`launch::mmq_supports`),
/// the scratch, and the device's opt-in shared memory for the kernel's ring.
pub fn mmq_runs(dev: &GpuDevice, ty: GgmlType, m: usize, k: usize, scratch_elements: usize) -> bool {
    mmq_supports(ty, m, k) && mmq_input_bytes(m, k) <= 2 * scratch_elements && mmq_shared_bytes(ty, m) <= dev.max_shared_optin
}

/// `out[m×n] = a[m×k] · Wᵀ` on the tensor cores straight from `ty` blocks (MMQ, `kernels/ggml.cu`):
/// the input quantized to int8 per 32 values into `scratch` (`quantize_q8_mmq`), then one block
/// per 64 rows of W and split of k (`launch::mmq_split`, aiming at `blocks_wanted` blocks); the
/// float partials of a split product follow the input in `scratch` and `mmq_reduce` sums them.
/// Where the scratch cannot hold the partials, fewer splits.
///
/// # Safety
/// As `ggml_linear`; `scratch` must hold at least `mmq_input_bytes(m, k)` bytes (16-byte
/// aligned).
#[allow(clippy::too_many_arguments)]
pub unsafe fn mmq_linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    a: CUdeviceptr,
    (ty, blocks): (GgmlType, CUdeviceptr),
    (scratch, scratch_elements): (CUdeviceptr, usize),
    m: usize,
    k: usize,
    n: usize,
    blocks_wanted: usize,
) -> Result<(), CudaError> {
    if !mmq_runs(dev, ty, m, k, scratch_elements) || n == 0 {
        return Err(CudaError::Config(format!("MMQ does not take {ty:?} m {m} k {k} n {n} in {scratch_elements} bf16 of scratch")));
    }
    let tokens = mmq_tokens(m);
    let (xq, xd) = (scratch, scratch + (tokens * k) as u64);
    let xs = xd + (tokens * (k / 32) * 4) as u64;
    let partial = scratch + mmq_input_bytes(m, k) as u64;
    let split = mmq_plan(m, k, n, 2 * scratch_elements, blocks_wanted);
    super::launchers::quantize_q8_mmq(dev, mmq_quantize_config(m, k), xq, xd, xs, a, m as i32, k as i32, tokens as i32)?;
    let config = cudarc::driver::LaunchConfig {
        grid_dim: (n.div_ceil(MMQ_ROWS) as u32, split.splits as u32, 1),
        block_dim: (mmq_threads(m), 1, 1),
        shared_mem_bytes: mmq_shared_bytes(ty, m) as u32,
    };
    let out_f32 = i32::from(out_type == OutType::F32);
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    super::launchers::mmq(dev, ty, m, config, out, out_f32, partial, xq, xd, xs, blocks, m32, n32, k32, split.per_split as i32)?;
    if split.splits > 1 {
        super::launchers::mmq_reduce(dev, grid_stride_config(m * n), out, out_f32, partial, (m * n) as i32, split.splits as i32)?;
    }
    Ok(())
}
