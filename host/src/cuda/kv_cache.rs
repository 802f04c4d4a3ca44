//! The paged KV cache in device memory: one key and one value array per layer, in the layout of
//! `kv_cache::KvCacheLayout` (`[num_blocks, num_kv_heads, block_size, head_dim]`) of bfloat16
//! values, held as bytes so that an E4M3 cache (`KvCacheDtype::Fp8E4M3`) can share the type once
//! the attention kernels read one (until then it is refused here).
//! Which blocks belong to whom is the block pool's business; this stores and copies.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaSlice;

use super::model::ptr;
use super::{CudaError, GpuDevice};
use crate::kv_cache::{BlockId, KvCacheDtype, KvCacheLayout};
use crate::model::ModelConfig;

/// Keys and values of every layer on the device, as bytes (`dtype` says what they hold).
pub struct GpuKvCache {
    layout: KvCacheLayout,
    dtype: KvCacheDtype,
    keys: Vec<CudaSlice<u8>>,
    values: Vec<CudaSlice<u8>>,
}

/// Bytes a bfloat16 value takes: the cache's type under `KvCacheDtype::Auto`.
const BF16_BYTES: usize = 2;

impl GpuKvCache {
    pub fn new(dev: &GpuDevice, layout: KvCacheLayout, dtype: KvCacheDtype) -> Result<Self, CudaError> {
        if dtype == KvCacheDtype::Fp8E4M3 {
            // The attention kernels that read E4M3 bytes are not in this build yet: refused
            // rather than read as bf16.
            return Err(CudaError::Unavailable(format!(
                "an FP8 KV cache runs on the CPU only in this build (the GPU's FP8 attention kernels are not in it yet); {} would read it as bf16",
                dev.name
            )));
        }
        let bytes = layout.layer_len() * dtype.bytes_per_value(BF16_BYTES);
        let alloc = || dev.stream.alloc_zeros::<u8>(bytes);
        Ok(GpuKvCache {
            keys: (0..layout.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?,
            values: (0..layout.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?,
            layout,
            dtype,
        })
    }

    /// Bytes one block of `block_size` tokens of `dtype` takes for this model.
    pub fn block_bytes(config: &ModelConfig, block_size: usize, dtype: KvCacheDtype) -> usize {
        KvCacheLayout::for_model(config, 1, block_size).block_bytes(dtype.bytes_per_value(BF16_BYTES))
    }

    pub fn layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    pub fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }

    /// Raw key and value array pointers of `layer` (for kernel checks).
    pub fn layer_ptrs(&self, dev: &GpuDevice, layer: usize) -> (CUdeviceptr, CUdeviceptr) {
        (ptr(dev, &self.keys[layer]), ptr(dev, &self.values[layer]))
    }

    /// Copies whole blocks (every layer, keys and values), `(source, destination)` pairs in
    /// order, on the stream (copy-on-write of shared blocks).
    pub fn copy_blocks(&self, dev: &GpuDevice, copies: &[(BlockId, BlockId)]) {
        let layout = self.layout;
        let bytes = (layout.num_kv_heads * layout.block_size * layout.head_dim * self.dtype.bytes_per_value(BF16_BYTES)) as u64;
        for array in self.keys.iter().chain(self.values.iter()) {
            let base = ptr(dev, array);
            for &(src, dst) in copies {
                // SAFETY: distinct blocks of one live allocation never overlap; same stream as
                // every kernel that reads or writes the cache.
                let result = unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        base + dst as u64 * bytes,
                        base + src as u64 * bytes,
                        bytes as usize,
                        dev.stream.cu_stream(),
                    )
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "copy-on-write block copy failed");
                }
            }
        }
    }
}
