//! Launching one layer's paged attention: the flash prefill kernel over the batch's tiles, the
//! decode kernel over its decode rows (which in decode-only batches may apply RoPE and write the
//! cache itself: `FusedRope`), and the split-K reduction when decode is split (`SplitMerge`,
//! which the next GEMV may do in its staging instead).

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::launch::{decode_shared_bytes, prefill_shared_bytes, AttentionSplit, DECODE_THREADS, PREFILL_THREADS};
use super::launchers;
use super::{CudaError, GpuDevice};
use crate::kv_cache::KvCacheDtype;

/// Device pointers and sizes of one layer's attention: the prefill kernel over `tiles` (see
/// `kernels/prefill_attention.cu`), the decode kernel over `decode_rows` (see
/// `kernels/paged_attention.cu`); either may be empty.
pub struct AttentionArgs {
    pub out: CUdeviceptr,
    pub q: CUdeviceptr,
    pub q_stride: usize,
    pub k_cache: CUdeviceptr,
    pub v_cache: CUdeviceptr,
    pub block_tables: CUdeviceptr,
    pub token_seq: CUdeviceptr,
    pub positions: CUdeviceptr,
    pub max_blocks: usize,
    /// Prefill tiles (`AttentionPlan::tiles`, 3 words each) and their count.
    pub tiles: CUdeviceptr,
    pub num_tiles: usize,
    /// Token rows of the decode kernel, or 0 for rows `0..num_decode`.
    pub decode_rows: CUdeviceptr,
    pub num_decode: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Positions a query sees, itself included; 0 for all (no sliding window).
    pub window: usize,
    /// Multiplies q·k before the softmax (`LayerAttention::scale`).
    pub scale: f32,
    /// Split-K of the decode kernel, planned for at least the longest decode context; with more
    /// than one split, `partials` must hold `num_tokens * num_heads * splits` rows for every token
    /// row of the batch (they are indexed by token row, not by decode row).
    pub split: AttentionSplit,
    pub partials: (CUdeviceptr, CUdeviceptr, CUdeviceptr),
    /// RoPE and the cache write done by the decode kernel instead of `rope_and_cache`; `q` then
    /// points at the unrotated QKV rows (`q_stride` their width). Only for batches without
    /// prefill tiles, where every token is its sequence's only one.
    pub rope: Option<FusedRope>,
    /// With splits, leave the merge of the partials to the caller (`SplitMerge`): the next GEMV
    /// merges them in its staging, or `SplitMerge::launch` runs the merge kernel.
    pub defer_merge: bool,
    /// Device bytes the decode kernel's blocks pull into L2 for the product after it (the
    /// o-projection's weights, up to `GpuDevice::l2_prefetch_limit`, in batches of
    /// `launch::L2_PREFETCH_ROWS`), from the address given; (0, 0) for none. The address 16-byte
    /// aligned, the bytes a multiple of 16.
    pub l2_prefetch: (CUdeviceptr, usize),
    /// Whether the decode kernel reads the cache under an evict-first L2 policy (each key and
    /// value is read once a step), so that the prefetched weights stay (`GpuDevice::kv_evict_first`).
    pub kv_evict_first: bool,
    /// What the cache holds: bf16 values, or E4M3 bytes (the `_fp8` kernels).
    pub cache: KvCacheDtype,
}

/// The merge of one layer's decode attention partials into its output (`attention_reduce_hd*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitMerge {
    pub out: CUdeviceptr,
    pub partials: (CUdeviceptr, CUdeviceptr, CUdeviceptr),
    /// Token rows of the decode kernel, or 0 for rows `0..num_decode`.
    pub decode_rows: CUdeviceptr,
    pub num_decode: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub splits: usize,
}

impl SplitMerge {
    /// The merge of `a`'s decode partials, when its decode kernel is split.
    pub fn of(a: &AttentionArgs) -> Option<SplitMerge> {
        (a.num_decode > 0 && a.split.splits > 1).then_some(SplitMerge {
            out: a.out,
            partials: a.partials,
            decode_rows: a.decode_rows,
            num_decode: a.num_decode,
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            splits: a.split.splits,
        })
    }

    /// Enqueues the merge kernel.
    pub fn launch(&self, dev: &GpuDevice) -> Result<(), CudaError> {
        let config = LaunchConfig { grid_dim: (self.num_decode as u32, self.num_kv_heads as u32, 1), block_dim: (DECODE_THREADS, 1, 1), shared_mem_bytes: 0 };
        let (part_out, part_max, part_sum) = self.partials;
        let (splits, heads, kv_heads) = (self.splits as i32, self.num_heads as i32, self.num_kv_heads as i32);
        // SAFETY: the partials hold a row per (token, head, split) of the attention that planned
        // this merge, `out` a row of `num_heads * head_dim` per token row.
        unsafe { launchers::attention_reduce(dev, self.head_dim, config, self.out, part_out, part_max, part_sum, self.decode_rows, splits, heads, kv_heads) }
    }
}

/// What the decode kernel needs to rotate the queries and keys itself (rotate-half RoPE over the
/// first `rotary_dim` dimensions of each head, as `rope_and_cache` with `interleaved` 0) and to
/// write each token's key and value to its cache slot.
#[derive(Clone, Copy)]
pub struct FusedRope {
    pub slots: CUdeviceptr,
    pub inv_freq: CUdeviceptr,
    pub position_scale: f32,
    pub rotary_dim: usize,
    pub magnitude: f32,
    /// The QKV product left as float32 partials over slices of K (`gemm::split_k_partials`): their
    /// address, how many slices, and the floats from one slice to the next; the kernel sums them
    /// as it reads each row, and `q`'s bf16 rows are never read.
    pub qkv_partials: Option<(CUdeviceptr, usize, usize)>,
}

/// One layer's attention: the prefill kernel over the tiles, then the decode kernel (and the
/// split-K reduction when `split.splits > 1`) over the decode rows. A decode-only batch has no
/// tiles and no row indirection.
pub fn launch_attention(dev: &GpuDevice, a: &AttentionArgs) -> Result<(), CudaError> {
    if a.rope.is_some() && a.num_tiles > 0 {
        return Err(CudaError::Config("RoPE fused into the decode kernel in a batch with prefill tiles".into()));
    }
    let (q_stride, max_blocks) = (a.q_stride as i32, a.max_blocks as i32);
    let (heads, kv_heads, block_size) = (a.num_heads as i32, a.num_kv_heads as i32, a.block_size as i32);
    let (scale, window) = (a.scale, a.window.min(i32::MAX as usize) as i32);
    if a.num_tiles > 0 {
        // Heads vary fastest, so the blocks that share a KV head's keys run side by side.
        let config = LaunchConfig {
            grid_dim: (a.num_heads as u32, a.num_tiles as u32, 1),
            block_dim: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: prefill_shared_bytes(a.head_dim, a.cache) as u32,
        };
        // SAFETY: the caller's pointers describe the batch (see `AttentionArgs`).
        unsafe {
            launchers::prefill_attention(
                dev, a.head_dim, a.cache, config, a.out, a.q, a.k_cache, a.v_cache, a.block_tables, a.positions, a.tiles, q_stride,
                max_blocks, heads, kv_heads, block_size, scale, window,
            )?;
        }
    }
    if a.num_decode == 0 {
        return Ok(());
    }
    let partition = a.split.partition.min(i32::MAX as usize) as i32;
    let (part_out, part_max, part_sum) = a.partials;
    let config = LaunchConfig {
        grid_dim: (a.num_decode as u32, a.num_kv_heads as u32, a.split.splits as u32),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: decode_shared_bytes(a.head_dim, a.cache) as u32,
    };
    let rope = a.rope.unwrap_or(FusedRope { slots: 0, inv_freq: 0, position_scale: 1.0, rotary_dim: 0, magnitude: 1.0, qkv_partials: None });
    let (qkv_partials, qkv_splits, qkv_split_stride) = rope.qkv_partials.unwrap_or((0, 0, 0));
    // SAFETY: as above; with splits, the partials hold a row per (token, head, split); with RoPE
    // fused, `q` holds whole QKV rows (or the partials `qkv_splits` blocks of them) and the slots
    // one entry per token.
    unsafe {
        launchers::paged_attention(
            dev, a.head_dim, a.cache, config, a.out, part_out, part_max, part_sum, a.q, a.k_cache, a.v_cache, a.block_tables,
            a.token_seq, a.positions, a.decode_rows, q_stride, max_blocks, heads, kv_heads, block_size, scale, partition,
            window, rope.slots, rope.inv_freq, rope.position_scale, rope.rotary_dim as i32, rope.magnitude, qkv_partials,
            qkv_splits as i32, qkv_split_stride as u64, a.l2_prefetch.0, a.l2_prefetch.1 as u64, i32::from(a.kv_evict_first),
        )?;
    }
    match SplitMerge::of(a) {
        Some(merge) if !a.defer_merge => merge.launch(dev),
        _ => Ok(()),
    }
}
