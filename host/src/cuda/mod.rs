//! The CUDA backend: cudarc with dynamic loading (the binary builds and runs without CUDA and
//! picks the GPU when one is there), kernels from `kernels/` compiled by NVRTC at start-up and
//! cached on disk, cuBLAS GEMMs in bfloat16 with float32 accumulation, and the GPU forward of
//! every architecture of `model::arch` (`forward`: the `Ops` of the shared decoder) behind the
//! same `ModelBackend` contract as the CPU path.

mod attention;
mod batch;
mod blaslt;
pub mod collective;
mod device;
mod forward;
pub mod fp8_gemm;
pub mod gemm;
pub mod gemv;
mod graphs;
mod kv_cache;
pub mod kernels;
pub mod launch;
pub mod launchers;
mod model;
mod parallel;
pub mod profile;
pub mod sampling;
pub mod skinny;
mod standalone;
pub mod tuned_gemm;
pub mod weights;

pub use self::device::{FusedMerge, GpuDevice, PdlScope, SplitK, DECODE_HEAD_DIMS};
pub use self::attention::{launch_attention, AttentionArgs};
pub use self::kv_cache::GpuKvCache;
pub use self::forward::Omit;
pub use self::model::{GpuBackend, GpuModel};
pub use self::parallel::GpuTensorParallelBackend;
#[cfg(feature = "tools")]
pub(crate) use self::model::ptr;
pub use self::standalone::StandaloneAttention;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("cuBLASLt: {0}")]
    BlasLt(#[from] cudarc::cublaslt::result::CublasError),
    #[error("compiling kernel module `{module}`: {message}")]
    Compile { module: String, message: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// Whether a CUDA driver and at least one GPU can be found. cudarc loads the driver library on
/// first use and panics when it is absent, so its presence is checked first.
pub fn is_available() -> bool {
    // SAFETY: only tries to open the driver library; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    cudarc::driver::CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn availability_is_answered_without_panicking_when_the_driver_is_absent() {
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        let available = super::is_available();
        // Without the driver library there is no GPU; with it, the answer comes from the driver.
        assert!(driver_present || !available);
        if !driver_present {
            let err = super::GpuDevice::new(0).err().expect("no device without a driver");
            assert!(err.to_string().contains("not available"), "{err}");
        }
    }
}
