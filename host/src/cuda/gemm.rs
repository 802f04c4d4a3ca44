//! Linear layers through cuBLAS: `out[m×n] = a[m×k] · wᵀ` with row-major bf16 operands (`w` is a
//! `[n×k]` weight), float32 accumulation, and a bf16 or float32 result. Up to 8 rows go to our
//! GEMV (`cuda::gemv`: cuBLAS is slow at batch 1), more to cuBLAS.

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::sys::CUdeviceptr;

use super::gemv::{gemv, Gemv, GemvInput, GemvWeight};
use super::launch::{gemv_prefers, WeightFormat};
use super::{CudaError, GpuDevice};

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
        return gemv(
            dev,
            &Gemv {
                out,
                out_type,
                input: GemvInput::Plain(a),
                w: GemvWeight::Bf16(w),
                bias: 0,
                m,
                k,
                n,
            },
        );
    }
    cublas_linear(dev, out, out_type, a, w, m, k, n)
}

/// The same product through cuBLAS, whatever `m`.
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
) -> Result<(), CudaError> {
    if m == 0 {
        return Ok(());
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
        n as i32,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )?;
    Ok(())
}
