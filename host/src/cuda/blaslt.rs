//! cuBLASLt plumbing shared by the FP8 GEMMs (`cuda::fp8_gemm`) and the timed bf16 products
//! (`cuda::tuned_gemm`): a plan (a matmul descriptor, the three matrix layouts and the chosen
//! algorithm) for `out[m×n] = x[m×k] · Wᵀ` with row-major operands, which cuBLAS, column-major,
//! sees as `outᵀ (n×m) = op(W) · xᵀ`: W `[n, k]` read transposed, x `[m, k]`, both K-major
//! (the "TN" layout Hopper's FP8 GEMMs require), and the heuristic's candidate algorithms.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::CudaError;

/// Sets one descriptor attribute. Attributes are plain values; cuBLASLt copies them.
///
/// # Safety
/// `desc` must be live and `T` the attribute's type.
pub(super) unsafe fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<(), CudaError> {
    lt::set_matmul_desc_attribute(desc, attr, (value as *const T).cast(), size_of::<T>()).map_err(|e| CudaError::Config(format!("cuBLASLt {attr:?}: {e}")))
}

/// A cuBLASLt handle, destroyed with its holder (`Fp8Gemm`, `TunedGemm`). A holder declares it
/// after the plans made with it, so that those are destroyed first.
pub(super) struct Handle(sys::cublasLtHandle_t);

// SAFETY: a holder uses its handle only through `&mut` (under the device's lock), from whichever
// thread holds that.
unsafe impl Send for Handle {}

impl Handle {
    pub fn new() -> Result<Self, CudaError> {
        Ok(Handle(lt::create_handle()?))
    }

    pub fn raw(&self) -> sys::cublasLtHandle_t {
        self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created once, in `new`.
        unsafe {
            let _ = lt::destroy_handle(self.0);
        }
    }
}

/// The descriptors and algorithm of one product shape.
pub(super) struct Plan {
    pub desc: sys::cublasLtMatmulDesc_t,
    /// The weight, `[k × n]` column-major (read transposed).
    pub a: sys::cublasLtMatrixLayout_t,
    /// The input, `[k × m]` column-major.
    pub b: sys::cublasLtMatrixLayout_t,
    /// The output, `[n × m]` column-major with `ldd` between columns (rows of `out`).
    pub d: sys::cublasLtMatrixLayout_t,
    /// Zeroed until chosen (`candidates`).
    pub algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side cuBLASLt objects, used only through their holder's `&mut`
// (under the device's lock), from whichever thread holds that.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each was created once, by `Plan::new`, and is destroyed once, here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Plan {
    /// A plan for `m, n, k` with the weight in `w_type`, the input in `x_type` and the output in
    /// `out_type`, `ldd` elements between output rows; float32 accumulation and scales. The
    /// algorithm is left for the caller to choose.
    pub fn new(
        w_type: sys::cudaDataType,
        x_type: sys::cudaDataType,
        out_type: sys::cudaDataType,
        m: usize,
        n: usize,
        k: usize,
        ldd: usize,
    ) -> Result<Plan, CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)?;
        // From here on the plan owns what is made and `Drop` destroys it; a layout that fails
        // leaves null handles, which cuBLASLt's destroy calls accept.
        let mut plan = Plan { desc, a: std::ptr::null_mut(), b: std::ptr::null_mut(), d: std::ptr::null_mut(), algo: unsafe { std::mem::zeroed() } };
        plan.a = lt::create_matrix_layout(w_type, k as u64, n as u64, k as i64)?;
        plan.b = lt::create_matrix_layout(x_type, k as u64, m as u64, k as i64)?;
        plan.d = lt::create_matrix_layout(out_type, n as u64, m as u64, ldd as i64)?;
        // SAFETY: the descriptor is live; the values are of their attributes' types.
        unsafe {
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &(cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &(cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32))?;
        }
        Ok(plan)
    }

    /// Up to `count` algorithms the heuristic offers for the plan as its descriptor now stands,
    /// best first, each needing at most `workspace_bytes` and operands aligned to no more than
    /// `alignment` bytes (cuBLASLt assumes 256 unless told); an error when there is none.
    pub fn candidates(&self, handle: sys::cublasLtHandle_t, workspace_bytes: usize, alignment: usize, count: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, CudaError> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = lt::create_matmul_pref()?;
        let (bytes, alignment) = (workspace_bytes as u64, alignment as u32);
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
        let mut found = 0i32;
        // SAFETY: the plan's handles are live; each value is of its attribute's type; `results`
        // has room for `count` entries, of which cuBLASLt fills `found`.
        let status = unsafe {
            let set = |attr: Pref, value: *const c_void, size: usize| lt::set_matmul_pref_attribute(pref, attr, value, size);
            set(Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&bytes as *const u64).cast(), size_of::<u64>())
                .and_then(|_| {
                    [
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    ]
                    .into_iter()
                    .try_for_each(|attr| set(attr, (&alignment as *const u32).cast(), size_of::<u32>()))
                })
                .and_then(|_| {
                    sys::cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.d, self.d, pref, count as i32, results.as_mut_ptr(), &mut found)
                        .result()
                })
        };
        // SAFETY: made above, used by nothing else.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        status.map_err(|e| CudaError::Config(format!("cuBLASLt heuristic: {e}")))?;
        // SAFETY: cuBLASLt wrote the first `found` entries.
        unsafe { results.set_len(found.clamp(0, count as i32) as usize) };
        let algos: Vec<_> = results.into_iter().filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).map(|r| r.algo).collect();
        if algos.is_empty() {
            return Err(CudaError::Config("cuBLASLt has no algorithm for this product".into()));
        }
        Ok(algos)
    }
}
