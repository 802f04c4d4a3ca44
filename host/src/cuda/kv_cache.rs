//! The paged KV cache in device memory: one key and one value array per layer, in the layout of
//! `kv_cache::KvCacheLayout` (`[num_blocks, num_kv_heads, block_size, head_dim]`, bfloat16).
//! Which blocks belong to whom is the block pool's business; this stores and copies.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaSlice;
use half::bf16;

use super::model::ptr;
use super::{CudaError, GpuDevice};
use crate::kv_cache::{BlockId, KvCacheLayout};
use crate::model::ModelConfig;

/// Keys and values of every layer on the device.
pub struct GpuKvCache {
    layout: KvCacheLayout,
    keys: Vec<CudaSlice<bf16>>,
    values: Vec<CudaSlice<bf16>>,
}

impl GpuKvCache {
    pub fn new(dev: &GpuDevice, layout: KvCacheLayout) -> Result<Self, CudaError> {
        let alloc = || dev.stream.alloc_zeros::<bf16>(layout.layer_len());
        Ok(GpuKvCache {
            keys: (0..layout.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?,
            values: (0..layout.num_layers).map(|_| alloc()).collect::<Result<_, _>>()?,
            layout,
        })
    }

    /// Blocks that fit in `bytes` of device memory for this model.
    pub fn blocks_for_bytes(config: &ModelConfig, block_size: usize, bytes: usize) -> usize {
        let per_block = 2 * config.num_hidden_layers * config.num_key_value_heads * block_size * config.head_dim * 2;
        bytes / per_block
    }

    pub fn layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    /// Raw key and value array pointers of `layer` (for kernel checks).
    pub fn layer_ptrs(&self, dev: &GpuDevice, layer: usize) -> (CUdeviceptr, CUdeviceptr) {
        (ptr(dev, &self.keys[layer]), ptr(dev, &self.values[layer]))
    }

    /// Copies whole blocks (every layer, keys and values), `(source, destination)` pairs in
    /// order, on the stream (copy-on-write of shared blocks).
    pub fn copy_blocks(&self, dev: &GpuDevice, copies: &[(BlockId, BlockId)]) {
                let layout = self.layout;
        let len = layout.num_kv_heads * layout.block_size * layout.head_dim;
        for array in self.keys.iter().chain(self.values.iter()) {
            let base = ptr(dev, array);
            for &(src, dst) in copies {
                let bytes = (len * 2) as u64;
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
