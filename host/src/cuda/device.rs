//! One GPU: its context, the stream all work goes to, a cuBLAS handle, the compiled kernels and
//! the device facts launch configurations need.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use cudarc::driver::sys::CUfunction_attribute;

use super::kernels::Kernels;
use super::launch::{decode_kernel_name, decode_shared_bytes, prefill_kernel_name, prefill_shared_bytes, DECODE_THREADS};

const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
use super::CudaError;

pub struct GpuDevice {
    pub context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    _blas_workspace: cudarc::driver::CudaSlice<u8>,
    pub kernels: Kernels,
    pub name: String,
    pub arch: String,
    pub num_sms: usize,
    /// Resident blocks per multiprocessor of the decode attention kernel, by head dimension.
    decode_blocks_per_sm: Vec<(usize, usize)>,
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
        unsafe {
            let (workspace_ptr, _) = cudarc::driver::DevicePtr::device_ptr(&workspace, &stream);
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
        for head_dim in DECODE_HEAD_DIMS {
            let (function, shared) = (kernels.get(&decode_kernel_name(head_dim)), decode_shared_bytes(head_dim));
            function.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
            let blocks = function.occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, shared, None)?;
            decode_blocks_per_sm.push((head_dim, blocks.max(1) as usize));
            let (function, shared) = (kernels.get(&prefill_kernel_name(head_dim)), prefill_shared_bytes(head_dim));
            function.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32)?;
        }
        let name = context.name()?;
        tracing::info!(gpu = %name, %arch, num_sms, "CUDA device ready");
        Ok(Arc::new(GpuDevice {
            context,
            stream,
            blas,
            _blas_workspace: workspace,
            kernels,
            name,
            arch,
            num_sms,
            decode_blocks_per_sm,
        }))
    }

    /// Decode attention blocks of this head dimension that run at once on the whole GPU (the
    /// `slots` of `AttentionSplit::plan`).
    pub fn decode_slots(&self, head_dim: usize) -> usize {
        let per_sm = self.decode_blocks_per_sm.iter().find(|&&(hd, _)| hd == head_dim).map_or(1, |&(_, b)| b);
        per_sm * self.num_sms
    }

    pub fn function(&self, name: &str) -> &CudaFunction {
        self.kernels.get(name)
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.context.mem_get_info()?)
    }
}
