//! Launch arithmetic of the GPU forward, kept free of CUDA calls so it is unit-tested on machines
//! without a GPU: how a batch's block tables are packed for the kernels, which tokens go to the
//! prefill and which to the decode attention kernel, how many split-K partitions decode attention
//! uses, which CUDA-graph bucket a decode batch falls in, and which products go to the GEMV or
//! split over K.

use super::SplitK;
use crate::kv_cache::KvCacheDtype;
use crate::model::gguf::GgmlType;
use crate::runner::ForwardBatch;

/// A row-range switch's value (`PAGEDSERVE_SKINNY`, `PAGEDSERVE_BLAS_TUNE`): unset, `off` or `0`
/// is `None`; `on` or `1` is `on`; `A-B` is rows A to B, within 1 to `most`. The error names
/// `var` and what it takes.
pub fn parse_row_range(var: &str, value: Option<&str>, on: std::ops::RangeInclusive<usize>, most: usize) -> Result<Option<std::ops::RangeInclusive<usize>>, String> {
    let bad = |v: &str| format!("{var} is off, on or a row range A-B within 1-{most}, not {v:?}");
    match value {
        None | Some("off" | "0") => Ok(None),
        Some("on" | "1") => Ok(Some(on)),
        Some(v) => {
            let (a, b) = v.split_once('-').ok_or_else(|| bad(v))?;
            let (a, b) = (a.trim().parse::<usize>().map_err(|_| bad(v))?, b.trim().parse::<usize>().map_err(|_| bad(v))?);
            if a == 0 || a > b || b > most {
                return Err(bad(v));
            }
            Ok(Some(a..=b))
        }
    }
}

/// Threads of one decode attention block (`DC_THREADS` in `kernels/paged_attention.cu`), keys per
/// pipeline tile (`DC_N`) and the row padding (`DC_PAD`).
pub const DECODE_THREADS: u32 = 128;
pub const DECODE_TILE_KEYS: usize = 64;
const DECODE_ROW_PAD: usize = 8;
/// Block-table entries a decode attention block stages in shared memory, after its ring of tiles
/// (`DC_TABLE`): a partition of up to this many cache blocks reads its table there.
const DECODE_TABLE_ENTRIES: usize = 256;

/// Tiles in the decode kernel's ring for this head dimension (the `DECODE_KERNEL` instantiations:
/// four tiles of half the size at head dim 64, two at 128); over an FP8 cache twice as many of
/// half the bytes (`DECODE_FP8_KERNEL`).
pub fn decode_stages(head_dim: usize, cache: KvCacheDtype) -> usize {
    let bf16 = if head_dim <= 64 { 4 } else { 2 };
    match cache {
        KvCacheDtype::Auto => bf16,
        KvCacheDtype::Fp8E4M3 => 2 * bf16,
    }
}

/// Bytes of one key row and one value row in the decode kernel's ring (`DecodeRows`): bf16 rows
/// padded by `DC_PAD` elements, or raw E4M3 rows at their bank-conflict-free strides.
fn decode_row_bytes(head_dim: usize, cache: KvCacheDtype) -> (usize, usize) {
    match cache {
        KvCacheDtype::Auto => ((head_dim + DECODE_ROW_PAD) * 2, (head_dim + DECODE_ROW_PAD) * 2),
        KvCacheDtype::Fp8E4M3 => (head_dim + if head_dim == 64 { 0 } else { 16 }, head_dim + 16),
    }
}

/// What the split planner charges, in units of one tile's load: each block beyond its own tiles
/// (filling the pipeline before the first, merging the warps after the last), and split-K once
/// (the reduction kernel's launch and its pass over the partials).
const BLOCK_OVERHEAD_TILES: usize = 1;
const REDUCE_OVERHEAD_TILES: usize = 2;

/// Block tables of every sequence of `batch`, row-major `[num_seqs, max_blocks]`, padded with 0
/// (padding is never read: the kernels stop at each token's position).
pub fn pack_block_tables(batch: &ForwardBatch) -> (Vec<u32>, usize) {
    let max_blocks = batch.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
    let mut packed = vec![0u32; batch.seqs.len().max(1) * max_blocks];
    for (row, seq) in batch.seqs.iter().enumerate() {
        packed[row * max_blocks..row * max_blocks + seq.block_table.len()].copy_from_slice(&seq.block_table);
    }
    (packed, max_blocks)
}

/// Query tokens per block of the prefill attention kernel (`PF_M` in
/// `kernels/prefill_attention.cu`), and its threads (`PF_THREADS`).
pub const PREFILL_TILE: usize = 64;
pub const PREFILL_THREADS: u32 = 128;

/// Which attention kernel takes which tokens of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// The backend's choice: sequences with more than one new token (prefill chunks, prefix-cache
    /// hits) go to the prefill kernel, one-token sequences (decode) to the decode kernel.
    Mixed,
    /// Every token through the per-token decode kernel (what every batch did before the prefill
    /// kernel; kept for checks and for benchmarking against).
    Decode,
    /// Every sequence, even of one token, through the prefill kernel (to check that kernel alone).
    Prefill,
}

/// The attention launches of one batch, computed on the host.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttentionPlan {
    /// Prefill tiles, `[sequence, first token row, tokens]`, at most `PREFILL_TILE` tokens each;
    /// longest context first, so the blocks with the most work start first and the short ones
    /// fill the tail of the grid.
    pub tiles: Vec<[u32; 3]>,
    /// Token rows the decode kernel takes; `None` when it takes every row (a decode-only batch:
    /// the kernel runs exactly as it did before there was a prefill kernel, with no indirection).
    pub decode_rows: Option<Vec<u32>>,
    /// Longest context of a decode row (sizes split-K); 0 when there is none.
    pub decode_context: usize,
}

impl AttentionPlan {
    /// Rows the decode kernel launches over.
    pub fn num_decode(&self, num_tokens: usize) -> usize {
        self.decode_rows.as_ref().map_or(num_tokens, Vec::len)
    }

    /// The tiles, flattened for upload.
    pub fn tile_words(&self) -> impl Iterator<Item = u32> + '_ {
        self.tiles.iter().flatten().copied()
    }
}

pub fn plan_attention(batch: &ForwardBatch, path: AttentionPath) -> AttentionPlan {
    let prefill = |len: usize| match path {
        AttentionPath::Mixed => len > 1,
        AttentionPath::Decode => false,
        AttentionPath::Prefill => true,
    };
    let mut tiles = Vec::new();
    let mut decode_rows = Vec::new();
    let mut decode_context = 0;
    for (index, seq) in batch.seqs.iter().enumerate() {
        if prefill(seq.tokens.len()) {
            for first in seq.tokens.clone().step_by(PREFILL_TILE) {
                let len = PREFILL_TILE.min(seq.tokens.end - first);
                tiles.push([index as u32, first as u32, len as u32]);
            }
        } else {
            decode_rows.extend(seq.tokens.clone().map(|t| t as u32));
            decode_context = decode_context.max(seq.context_len());
        }
    }
    // The last key a tile reads is its last token's position.
    let last_position = |t: &[u32; 3]| batch.positions[(t[1] + t[2] - 1) as usize];
    tiles.sort_by_key(|t| std::cmp::Reverse(last_position(t)));
    let decode_rows = if tiles.is_empty() { None } else { Some(decode_rows) };
    AttentionPlan { tiles, decode_rows, decode_context }
}

/// How the decode attention kernel cuts contexts into split-K partitions: `splits` blocks per
/// (token, KV head), block `i` covering positions `i * partition ..` up to `(i + 1) * partition`.
/// Planned for a context of at most some length, the partitions together cover all of it
/// (`splits * partition >= max_context`); a shorter context leaves the last blocks empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSplit {
    pub splits: usize,
    pub partition: usize,
}

impl AttentionSplit {
    /// One block per (token, KV head) over the whole context.
    pub const NONE: AttentionSplit = AttentionSplit { splits: 1, partition: i32::MAX as usize };

    /// Split-K for contexts of at most `max_context` positions in a launch of `work_items`
    /// (token, KV head) pairs, when `slots` decode blocks fit on the GPU at once
    /// (`GpuDevice::decode_slots`). Blocks run in waves of `slots`, and a launch lasts about as
    /// long as its waves times the tiles each block loads: more splits shorten every block but
    /// add waves once the grid outgrows one. The plan with the least estimated time wins (the
    /// fewer splits on a tie), with partitions of whole tiles. At batch 1 this cuts a long context
    /// into many short partitions (latency); at batch 64 and context 2048 on the 8B layout, into 3
    /// (4 nearly full waves rather than 2 splits' 2.6).
    pub fn plan(max_context: usize, work_items: usize, slots: usize) -> Self {
        let (items, slots) = (work_items.max(1), slots.max(1));
        let most = max_context.div_ceil(DECODE_TILE_KEYS).max(1);
        let cost = |split: &AttentionSplit| {
            let waves = (items * split.splits).div_ceil(slots);
            let tiles = split.partition.min(max_context).div_ceil(DECODE_TILE_KEYS);
            let reduce = if split.splits > 1 { REDUCE_OVERHEAD_TILES } else { 0 };
            waves * (tiles + BLOCK_OVERHEAD_TILES) + reduce
        };
        (1..=most)
            .map(|splits| Self::covering(splits, max_context))
            .min_by_key(|split| (cost(split), split.splits))
            .unwrap_or(Self::NONE)
    }

    /// At most `splits` partitions covering `max_context` positions, each a whole number of the
    /// kernel's tiles.
    pub fn covering(splits: usize, max_context: usize) -> Self {
        if splits <= 1 {
            return Self::NONE;
        }
        let partition = max_context.div_ceil(splits).div_ceil(DECODE_TILE_KEYS).max(1) * DECODE_TILE_KEYS;
        // Rounding the partition up may leave the last splits nothing to cover: drop them.
        match max_context.div_ceil(partition) {
            0 | 1 => Self::NONE,
            splits => AttentionSplit { splits, partition },
        }
    }
}

/// The decode attention kernel for this head dimension and cache type (any GQA group up to
/// `MAX_GQA_GROUP`: the group's heads are rows of one MMA tile).
pub fn decode_kernel_name(head_dim: usize, cache: KvCacheDtype) -> String {
    match cache {
        KvCacheDtype::Auto => format!("paged_attention_hd{head_dim}"),
        KvCacheDtype::Fp8E4M3 => format!("paged_attention_fp8_hd{head_dim}"),
    }
}

/// The most query heads per KV head the decode attention kernel takes.
pub const MAX_GQA_GROUP: usize = 16;

/// Dynamic shared memory of one decode attention block: its ring of key and value tiles
/// (`decode_row_bytes`) and its partition's stretch of the block table (`DC_TABLE` u32s), which
/// the end of the kernel reuses to merge its 4 warps' float32 states (16 rows of `head_dim`, plus
/// a max and a sum per row).
pub fn decode_shared_bytes(head_dim: usize, cache: KvCacheDtype) -> usize {
    let warps = DECODE_THREADS as usize / 32;
    let (key_row, value_row) = decode_row_bytes(head_dim, cache);
    let ring = decode_stages(head_dim, cache) * DECODE_TILE_KEYS * (key_row + value_row);
    let merge = warps * 16 * (head_dim + 2) * 4;
    (ring + DECODE_TABLE_ENTRIES * 4).max(merge)
}

/// Dynamic shared memory of one prefill attention block: a key tile and a value tile (bf16 rows
/// padded by `PF_PAD`), and over an FP8 cache the raw E4M3 rows they are converted from.
pub fn prefill_shared_bytes(head_dim: usize, cache: KvCacheDtype) -> usize {
    let tiles = 2 * PREFILL_TILE * (head_dim + DECODE_ROW_PAD) * 2;
    match cache {
        KvCacheDtype::Auto => tiles,
        KvCacheDtype::Fp8E4M3 => tiles + 2 * PREFILL_TILE * head_dim,
    }
}

/// The most dynamic shared memory a block of either attention kernel of `head_dim` over a `cache`
/// cache takes: what a device must allow for a model of that head dim
/// (`GpuDevice::attention_fits`).
pub fn attention_shared_bytes(head_dim: usize, cache: KvCacheDtype) -> usize {
    decode_shared_bytes(head_dim, cache).max(prefill_shared_bytes(head_dim, cache))
}

/// The prefill attention kernel for this head dimension and cache type (one per head dim: it
/// takes one query head per block, so any GQA group size works).
pub fn prefill_kernel_name(head_dim: usize, cache: KvCacheDtype) -> String {
    match cache {
        KvCacheDtype::Auto => format!("prefill_attention_hd{head_dim}"),
        KvCacheDtype::Fp8E4M3 => format!("prefill_attention_fp8_hd{head_dim}"),
    }
}

/// Batch sizes CUDA graphs are captured for; a decode batch runs in the smallest bucket that
/// holds it (padded with idle rows).
pub const GRAPH_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

pub fn graph_bucket(batch_size: usize) -> Option<usize> {
    GRAPH_BUCKETS.iter().copied().find(|&b| b >= batch_size)
}

/// Threads of `moe_gemm` and its tiles: assignments by output columns (`MOE_THREADS`, `MOE_BM`,
/// `MOE_BN` in `kernels/moe.cu`).
pub const MOE_THREADS: u32 = 128;
pub const MOE_TILE_ROWS: usize = 64;
pub const MOE_TILE_COLS: usize = 64;

/// The most tiles `moe_group` can cut `assignments` into over `experts` (every expert's run
/// rounded up to whole tiles): the grouped product's grid, whose blocks past the real count return.
pub fn moe_most_tiles(assignments: usize, experts: usize) -> usize {
    assignments.div_ceil(MOE_TILE_ROWS) + experts.min(assignments)
}

/// `moe_route`: one warp per token, 4 per block.
pub fn moe_route_config(tokens: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (tokens.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// `moe_group`: one block of 1024 threads.
pub const MOE_GROUP_CONFIG: cudarc::driver::LaunchConfig =
    cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };

/// `moe_gemm` over `cols` output columns and at most `most_tiles` tiles.
pub fn moe_gemm_config(cols: usize, most_tiles: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (cols.div_ceil(MOE_TILE_COLS) as u32, most_tiles as u32, 1),
        block_dim: (MOE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride kernel's launch over `items` work items: a thread each, blocks of 256, at most
/// 65,535 blocks (the kernel loops beyond).
pub fn grid_stride_config(items: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (items.div_ceil(256).clamp(1, 65_535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The launch of `dequant_ggml` (`kernels/ggml.cu`) over `rows` rows of `cols` values: a thread
/// per 8 values.
pub fn dequant_config(rows: usize, cols: usize) -> cudarc::driver::LaunchConfig {
    grid_stride_config(rows * cols.div_ceil(8))
}

/// The most input rows that the GEMV from GGUF blocks takes where MMQ could: the 8B shape's Q4_K
/// products at 4 rows take 217 µs on the GEMV against 273 on MMQ, at 8 rows 416 against 273 (H200;
/// the 4-row GEMV at 128 registers without spilling, see `gemv_ggml_body`).
pub const GGML_GEMV_ROWS_BESIDE_MMQ: usize = 4;

/// The most input rows of the batched product from GGUF blocks on the tensor cores (MMQ,
/// `kernels/ggml.cu`); larger products dequantize tiles of the weight for cuBLAS.
pub const MMQ_MAX_ROWS: usize = 64;

/// Whether the MMQ kernels take `m` input rows against `ty` blocks `k` values wide: whole 256
/// values (a stage of the kernel's ring) of Q4_0, Q4_1, Q8_0, Q4_K or Q5_K. (Q6_K's 210-byte
/// super-blocks are not 16-byte aligned for the copies.)
pub fn mmq_supports(ty: GgmlType, m: usize, k: usize) -> bool {
    mmq_row_stride(ty).is_some() && (1..=MMQ_MAX_ROWS).contains(&m) && k.is_multiple_of(256)
}

/// Bytes between the rows of a stage in MMQ's shared memory (`MmqType::STRIDE`): 256 values of
/// the type, padded where the rows of a fragment would share banks.
fn mmq_row_stride(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_K => Some(144),
        GgmlType::Q4_1 | GgmlType::Q5_K => Some(176),
        GgmlType::Q8_0 => Some(272),
        _ => None,
    }
}

/// The rows the MMQ kernel for `m` input rows is compiled for: 16, 32 or 64 (the quantized input
/// is padded with zero rows to it).
pub fn mmq_tokens(m: usize) -> usize {
    match m {
        ..=16 => 16,
        17..=32 => 32,
        _ => 64,
    }
}

/// Bytes of the quantized input of `m` rows of `k` (`quantize_q8_mmq`): int8 values, then a float
/// scale and a float sum per 32 values, for `mmq_tokens(m)` rows. The float partials of a split
/// product follow it in the same scratch.
pub fn mmq_input_bytes(m: usize, k: usize) -> usize {
    let tokens = mmq_tokens(m);
    tokens * k + 2 * 4 * tokens * (k / 32)
}

/// Weight rows of one MMQ block (`MMQ_ROWS`) and its ring's depth (`MMQ_STAGES`).
pub const MMQ_ROWS: usize = 64;
const MMQ_STAGES: usize = 3;

/// Threads of an MMQ block for `m` rows: a warp per 16 weight rows, and per half of the tokens
/// at 64 (`mmq_body`'s HALVES).
pub fn mmq_threads(m: usize) -> u32 {
    if mmq_tokens(m) == 64 {
        256
    } else {
        128
    }
}

/// Dynamic shared memory of the MMQ kernel for `m` rows of `ty`: each stage holds 256 values of
/// the block's 64 rows and those 256 columns of the quantized input (int8, with a scale and a sum
/// per 32).
pub fn mmq_shared_bytes(ty: GgmlType, m: usize) -> usize {
    MMQ_STAGES * (MMQ_ROWS * mmq_row_stride(ty).unwrap_or(0) + mmq_tokens(m) * (256 + 2 * 8 * 4))
}

pub fn mmq_kernel_name(ty: GgmlType, m: usize) -> String {
    format!("mmq_{}t{}", WeightFormat::Ggml(ty).kernel_part(), mmq_tokens(m))
}

/// How an MMQ product over `n` rows and `super_blocks` 256-value columns is cut along k: `splits`
/// blocks per 64 rows, each over `per_split` super-blocks (the last over what is left), so that a
/// narrow product (the 8B shape's 4096 rows are 64 blocks) still has about `blocks_wanted` blocks;
/// at least 4 super-blocks each, so that a block's ring of copies fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmqSplit {
    pub splits: usize,
    pub per_split: usize,
}

/// The split of an MMQ product of `m` rows by `[n, k]` with `scratch_bytes` for the quantized
/// input and the partials: `mmq_split` for `blocks_wanted`, or fewer splits where the partials
/// (`m·n` floats each) would not fit.
pub fn mmq_plan(m: usize, k: usize, n: usize, scratch_bytes: usize, blocks_wanted: usize) -> MmqSplit {
    let room = scratch_bytes.saturating_sub(mmq_input_bytes(m, k)) / (m * n * 4).max(1);
    mmq_split(n, k / 256, blocks_wanted.min(room * n.div_ceil(MMQ_ROWS)))
}

pub fn mmq_split(n: usize, super_blocks: usize, blocks_wanted: usize) -> MmqSplit {
    let row_blocks = n.div_ceil(MMQ_ROWS).max(1);
    let most = (super_blocks / 4).max(1);
    let splits = blocks_wanted.div_ceil(row_blocks).clamp(1, most);
    let per_split = super_blocks.div_ceil(splits).max(1);
    MmqSplit { splits: super_blocks.div_ceil(per_split).max(1), per_split }
}

/// `quantize_q8_mmq`'s grid: one thread per 8 values of the padded rows, blocks of 256.
pub fn mmq_quantize_config(m: usize, k: usize) -> cudarc::driver::LaunchConfig {
    grid_stride_config(mmq_tokens(m) * k / 8)
}

/// Threads per block for a row-wise kernel over `width` elements: a multiple of 32, at most 1024.
pub fn row_threads(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// The tokens of a batch whose decode attention pulls the o-projection's weights into L2
/// (`AttentionArgs::l2_prefetch`): up to 64 attention is latency-bound and leaves DRAM idle;
/// from a few hundred rows it streams far more cache than L2 holds, which would evict them. Not
/// at one row, where the o-projection's GEMV already issues its first loads as a programmatic
/// dependent while attention finishes, and the prefetch only competed with them: the 8B bf16
/// graph step took 4.479 and 4.508 ms with it against 4.424 without, served TPOT 4.50 against
/// 4.43 ms (H200, BENCHMARKS.md, session 21).
pub const L2_PREFETCH_ROWS: std::ops::RangeInclusive<usize> = 2..=64;

/// `fused_add_rmsnorm`'s block, one a row: a thread for every 8 values (`kernels/rmsnorm.cu`
/// holds them in registers), so rows up to 8,192 wide take one load round.
pub fn norm_config(rows: usize, width: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width.div_ceil(8)), 1, 1), shared_mem_bytes: 0 }
}

/// The gated activations' grid (`kernels/activation.cu`): row t in x, and each row spread over
/// enough blocks of 256 threads, 8 values a thread, to cover it, so that a few rows still fill
/// the GPU.
pub fn gated_config(rows: usize, inter: usize) -> cudarc::driver::LaunchConfig {
    const THREADS: usize = 256;
    let blocks_per_row = inter.div_ceil(THREADS * 8).max(1);
    cudarc::driver::LaunchConfig { grid_dim: (rows as u32, blocks_per_row as u32, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Warps (output rows in flight) per block of the small-M GEMV (`GEMV_WARPS` in
/// `kernels/gemv.cu`): one large block per multiprocessor, so the input staging (repeated per
/// block) is paid a hundred times, not thousands.
pub const GEMV_WARPS: u32 = 16;

/// The most input rows the GEMV takes; larger batches go to cuBLAS, which is fast there.
pub const GEMV_MAX_ROWS: usize = 8;

/// The most shared memory a bf16 or FP8 GEMV block stages its padded input rows in: 8 rows of
/// K = 4096, or one row of K = 49152. The warps' rings come on top, as many as the device's
/// opt-in limit leaves room for (`gemv_block_fit`).
pub const GEMV_MAX_SHARED: usize = 96 * 1024;

/// The same for the GEMV from GGUF blocks, whose staged rows take 1.25 bytes a value: 8 rows of
/// the Llama-3.1-8B down projection (K = 14336, 143 KB) fit in one block per multiprocessor
/// (sm_90 allows 227 KB; sm_80 163 KB, where such a product falls back to tiles).
pub const GGML_GEMV_MAX_SHARED: usize = 200 * 1024;

/// Stages of the bf16 and FP8 GEMV's per-warp ring (`GEMV_STAGES` in `kernels/gemv.cu`): a warp
/// keeps all but one of them in flight, and copies that many chunks before its
/// programmatic-dependent wait.
pub const GEMV_STAGES: usize = 6;

/// Bytes a warp of the bf16 and FP8 GEMV copies per ring stage (`GEMV_STAGE_VECTORS` (4) 16-byte
/// vectors a lane): one chunk of its row, or of each of its two FP8 rows.
pub const GEMV_STAGE_BYTES: usize = 4 * 32 * 16;

/// Shared memory each warp of the bf16 and FP8 GEMV streams its weight rows through: a ring of
/// `GEMV_STAGES` stages of `GEMV_STAGE_BYTES`, in `kernels/gemv.cu`; it comes on top of the
/// staged input (`gemv_shared_bytes`).
pub const GEMV_RING_BYTES_PER_WARP: usize = GEMV_STAGES * GEMV_STAGE_BYTES;

/// What a GEMV block's static shared memory (its reduction scratch) may take, kept out of the
/// opt-in limit when sizing the dynamic part.
const GEMV_STATIC_SHARED: usize = 1024;

/// The fewest warps a bf16 or FP8 GEMV block runs with; a product whose staged input leaves room
/// for fewer rings goes to cuBLAS.
const GEMV_MIN_RING_WARPS: usize = 4;

/// The most dynamic shared memory a GEMV block of `format` may use on a device that lets a block
/// opt in to `opt_in` bytes (the kernels' attribute, set at device start).
pub fn gemv_dynamic_shared_limit(format: WeightFormat, opt_in: usize) -> usize {
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8 => opt_in.saturating_sub(GEMV_STATIC_SHARED),
        WeightFormat::Ggml(_) => format.gemv_max_shared().min(opt_in),
    }
}

/// Warps of at most `wanted` a GEMV block of an `[m, k]` input runs with where blocks may opt in
/// to `opt_in` bytes of shared memory, and the dynamic shared memory it takes; `None` where even
/// the fewest do not fit. The bf16 and FP8 kernels give each warp a ring beside the staged input.
pub fn gemv_block_fit(m: usize, k: usize, format: WeightFormat, wanted: u32, opt_in: usize) -> Option<(u32, usize)> {
    let input = gemv_shared_bytes(m, k, format);
    let limit = gemv_dynamic_shared_limit(format, opt_in);
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8 => {
            let room = limit.checked_sub(input)? / GEMV_RING_BYTES_PER_WARP;
            let warps = (wanted as usize).min(room);
            (warps >= GEMV_MIN_RING_WARPS.min(wanted as usize)).then_some((warps as u32, input + warps * GEMV_RING_BYTES_PER_WARP))
        }
        WeightFormat::Ggml(_) => (input <= limit).then_some((wanted, input)),
    }
}

/// The GGUF GEMV kernels that stream one row a warp instead of two (`_r1` in `kernels/ggml.cu`):
/// Q4_K at one input row, every staging but the merge.
pub const GGML_ONE_ROW_WARP_KERNELS: [&str; 3] = ["gemv_q4_k_m1_r1", "gemv_q4_k_silu_m1_r1", "gemv_q4_k_norm_m1_r1"];

/// Whether a one-row Q4_K GEMV over `n` output rows should stream one row a warp (`_r1`) rather
/// than two, on `warp_slots` resident warps: where two rows a warp leave a last round mostly idle
/// and one row a warp does not (the 8B QKV, 6,144 rows on 2,112 warps: 72% of the rounds' warps
/// busy against 97%). The fraction busy is the work over the rounds times the warps.
pub fn ggml_one_row_warps(n: usize, warp_slots: usize) -> bool {
    let busy = |rows_per_warp: usize| {
        let groups = n.div_ceil(rows_per_warp);
        groups as f64 / (groups.div_ceil(warp_slots.max(1)) * warp_slots.max(1)) as f64
    };
    busy(1) > busy(2) + 0.1
}

/// What the GEMV's input staging computes (`MODE` in `kernels/gemv.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvMode {
    /// x is a bf16 `[m, k]` matrix.
    Plain,
    /// x is the gate_up buffer `[m, 2k]`; the input is silu(gate) · up.
    SiluMul,
    /// x is the float32 residual; the input is rmsnorm(residual + delta) · weight.
    AddNorm,
    /// x is the decode attention's split-K partials; the input is their merge (one row only).
    Merge,
}

/// How a matrix's values are stored on the device (`cuda::weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    /// E4M3 with a float32 scale per row (`model::fp8`), on sm_89 and newer.
    Fp8,
    /// GGUF blocks as stored, kept quantized: one of `WeightFormat::KEPT_GGML`.
    Ggml(GgmlType),
}

impl WeightFormat {
    /// The GGUF types the device keeps quantized and reads in its products (`kernels/ggml.cu`);
    /// every other type is dequantized to bf16 at load.
    pub const KEPT_GGML: [GgmlType; 6] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

    /// The format of kept GGUF blocks of `ty`, if the device keeps that type.
    pub fn kept(ty: GgmlType) -> Option<WeightFormat> {
        Self::KEPT_GGML.contains(&ty).then_some(WeightFormat::Ggml(ty))
    }

    /// What K must be a multiple of for the GEMV: the weights of a 16-byte vector of a row (of a
    /// ggml block).
    pub fn per_vector(self) -> usize {
        match self {
            WeightFormat::Bf16 => 8,
            WeightFormat::Fp8 => 16,
            WeightFormat::Ggml(ty) => ty.block_size(),
        }
    }

    /// Output rows a GEMV warp streams at once (`GemvRows` in `kernels/gemv.cu`, `RPW` in
    /// `kernels/ggml.cu`): FP8 and quantized rows are shorter in bytes, so a warp takes two to
    /// keep as many bytes in flight.
    pub fn rows_per_warp(self) -> usize {
        match self {
            WeightFormat::Bf16 => 1,
            WeightFormat::Fp8 | WeightFormat::Ggml(_) => 2,
        }
    }

    /// The most dynamic shared memory its GEMV kernels opt in to.
    pub fn gemv_max_shared(self) -> usize {
        match self {
            WeightFormat::Bf16 | WeightFormat::Fp8 => GEMV_MAX_SHARED,
            WeightFormat::Ggml(_) => GGML_GEMV_MAX_SHARED,
        }
    }

    /// The name of its GEMV kernels' weight part: "" (bf16), "fp8_", "q4_k_", ...
    fn kernel_part(self) -> String {
        match self {
            WeightFormat::Bf16 => String::new(),
            WeightFormat::Fp8 => "fp8_".into(),
            WeightFormat::Ggml(ty) => format!("{ty:?}_").to_lowercase(),
        }
    }
}

/// The most rows for which an FP8 weight larger than `GEMV_SMALL_WEIGHTS` goes through the FP8
/// GEMV rather than cuBLASLt's FP8 GEMM (which first quantizes its input, a second launch): one.
/// At two rows the GEMM was faster at every Llama-3.1-8B product on an H200 (94 µs a layer
/// against 110, and a whole decode step 4.52 ms at batch 4 against 4.81 at batch 2; BENCHMARKS.md,
/// session 10).
pub const FP8_GEMV_STREAM_ROWS: usize = 1;

/// Input rows padded to the kernel's tile: 1, 2, 4 or 8.
pub fn gemv_padded_rows(m: usize) -> usize {
    m.next_power_of_two()
}

/// Whether the GEMV takes `m` rows of width `k` of weights in `format`: 1 to 8 rows, whole
/// 16-byte vectors (k a multiple of 8 in bf16, 16 in FP8) or ggml blocks, and the padded rows fit
/// its shared memory (bf16: k up to 6144 at 8 rows, 49152 at one).
pub fn gemv_supports(m: usize, k: usize, format: WeightFormat) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&m) && k > 0 && k.is_multiple_of(format.per_vector()) && gemv_shared_bytes(m, k, format) <= format.gemv_max_shared()
}

/// Weights (elements) up to which the GEMV takes 2 to 8 rows: there the products are
/// latency-bound (SmolLM2's per-layer products, at most 1.8 M) and the GEMV's single launch with
/// its staging wins. Above it, a product is a weight stream, and at 2 rows or more cuBLAS's tensor
/// cores keep up with it where the GEMV's CUDA-core FMAs do not (H200, Llama-3.1-8B: 0.81-0.88x
/// of cuBLAS at 2 rows, 0.41x at 8; BENCHMARKS.md, session 9).
pub const GEMV_SMALL_WEIGHTS: usize = 2 << 20;

/// The shortest rows for which the GEMV streams a large weight at one row: a warp loads one row
/// at a time, so short rows (SmolLM2's 576) leave too few bytes in flight (its head at 1,725 GB/s
/// against cuBLAS's 3,543).
pub const GEMV_STREAM_MIN_K: usize = 2048;

/// Whether the GEMV should run `out[m×n] = x[m×k] · wᵀ`: it takes the shape, and the weight is
/// small (`GEMV_SMALL_WEIGHTS`) or it is one row of long rows (`GEMV_STREAM_MIN_K`), where the
/// GEMV streams as fast as cuBLAS and saves the fused element-wise launches. An FP8 weight
/// streams through the GEMV up to `FP8_GEMV_STREAM_ROWS` rows whatever its K: its alternative,
/// cuBLASLt's FP8 GEMM, needs its input quantized first.
pub fn gemv_prefers(m: usize, k: usize, n: usize, format: WeightFormat) -> bool {
    let stream = match format {
        WeightFormat::Bf16 => m == 1 && k >= GEMV_STREAM_MIN_K,
        WeightFormat::Fp8 => m <= FP8_GEMV_STREAM_ROWS,
        // From 5 rows MMQ (where it takes the type) beats the GEMV, whose int8 dot products
        // grow with the rows: 8B Q4_K products at 8 rows 273 µs against 416 (H200). Other types
        // keep the GEMV up to 8 rows: the alternative dequantizes the whole weight first.
        WeightFormat::Ggml(ty) => m <= GGML_GEMV_ROWS_BESIDE_MMQ || !mmq_supports(ty, m, k),
    };
    gemv_supports(m, k, format) && n > 0 && (n * k <= GEMV_SMALL_WEIGHTS || stream)
}

/// Dynamic shared memory of one GEMV block: the padded input rows in bf16; from ggml blocks the
/// rows in int8, a float scale and a float sum per 32 values (`stage_q8` in `kernels/ggml.cu`).
pub fn gemv_shared_bytes(m: usize, k: usize, format: WeightFormat) -> usize {
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8 => gemv_padded_rows(m) * k * 2,
        // The int8 rows take whole 128 bytes (`xq_at` permutes 16-byte slots within them).
        WeightFormat::Ggml(_) => (gemv_padded_rows(m) * k).next_multiple_of(128) + gemv_padded_rows(m) * k / 32 * 8,
    }
}

pub fn gemv_kernel_name(mode: GemvMode, m: usize, format: WeightFormat) -> String {
    let mode = match mode {
        GemvMode::Plain => "",
        GemvMode::SiluMul => "silu_",
        GemvMode::AddNorm => "norm_",
        GemvMode::Merge => "merge_",
    };
    format!("gemv_{}{mode}m{}", format.kernel_part(), gemv_padded_rows(m))
}

/// Every GEMV kernel (weight format, mode and padded row count) with its format, for the
/// device's start-up settings.
pub fn gemv_kernels() -> Vec<(String, WeightFormat)> {
    let modes = [GemvMode::Plain, GemvMode::SiluMul, GemvMode::AddNorm, GemvMode::Merge];
    let formats = [WeightFormat::Bf16, WeightFormat::Fp8].into_iter().chain(WeightFormat::KEPT_GGML.map(WeightFormat::Ggml));
    formats
        .flat_map(|format| {
            modes.iter().flat_map(move |&mode| {
                gemv_mode_rows(mode).iter().map(move |&m| (gemv_kernel_name(mode, m, format), format))
            })
        })
        .collect()
}

/// The padded row counts a staging mode is instantiated for: the merge of the attention splits
/// only at one row (a single stream's step, where its separate kernel's latency is exposed).
pub fn gemv_mode_rows(mode: GemvMode) -> &'static [usize] {
    match mode {
        GemvMode::Merge => &[1],
        _ => &[1, 2, 4, 8],
    }
}

/// Warps per GEMV block for `n` output rows: `GEMV_WARPS` when that still gives every
/// multiprocessor a block, else fewer (at least 4, a multiple of 4), so a small product (SmolLM2's
/// 576 rows) spreads over the GPU instead of 36 multiprocessors.
pub fn gemv_block_warps(n: usize, num_sms: usize) -> u32 {
    let per_sm = n.div_ceil(num_sms.max(1));
    (per_sm.div_ceil(4) * 4).clamp(4, GEMV_WARPS as usize) as u32
}

/// Blocks of `warps` warps for a GEMV over `n` output rows: one warp per row up to as many blocks as are resident
/// at once (`blocks_per_sm` on each multiprocessor), then the warps loop over rows. Never more:
/// a second wave would repeat the staging and leave most of the GPU idle at its end.
pub fn gemv_grid(n: usize, warps: u32, num_sms: usize, blocks_per_sm: usize) -> u32 {
    n.div_ceil(warps.max(1) as usize).clamp(1, blocks_per_sm.max(1) * num_sms.max(1)) as u32
}

/// Slices of K a split product (`gemm::split_k_partials`) is cut into unless
/// `$PAGEDSERVE_SPLIT_K_SLICES` says otherwise (`GpuDevice::split_k_slices`).
pub const SPLIT_K_SLICES: usize = 2;
/// The most slices `$PAGEDSERVE_SPLIT_K_SLICES` may ask for: the partials scratch
/// (`Scratch::product_partials`) holds this many.
pub const SPLIT_K_MAX_SLICES: usize = 4;
/// The most rows of a split product: the partials scratch holds `SPLIT_K_MAX_SLICES` of this many
/// rows of the hidden size.
pub const SPLIT_K_MAX_ROWS: usize = 64;

/// Into how many K slices (1: none) a bf16 product of `m` rows, `[n, k]` weight, goes through
/// cuBLAS, for a consumer that sums the float32 partials itself (`fused_add_rmsnorm_partials`:
/// the o and down projections, whose outputs join the residual). Where it pays (the 8B shapes on
/// an H100, strided-batched products into float32 against one product, each in a graph,
/// BENCHMARKS.md session 30): a K at least twice N (the down projection: 43.3 → 40.9 µs at 8
/// rows, 44.4 → 42.1 at 32, where cuBLAS splits it itself and adds a reduce launch) at 2-64
/// rows, and a square weight (the o projection: 16.4 → 14.0 µs) up to 16 rows, where cuBLAS's
/// kernel covers half the GPU; elsewhere two slices were slower. Both only for products of at
/// least 4096 by 4096, the shapes measured. `Qkv` adds the products whose N lies between K and
/// 2K (the 8B QKV, 6144 by 4096, on 96 blocks of 132 multiprocessors at 32 rows: BENCHMARKS.md,
/// session 23), whose partials the decode attention sums where it applies RoPE itself. A split
/// product has `slices` slices (`GpuDevice::split_k_slices`), each a multiple of 64 values of K.
pub fn split_k_splits(mode: SplitK, slices: usize, m: usize, k: usize, n: usize) -> usize {
    let takes = slices > 1 && (2..=SPLIT_K_MAX_ROWS).contains(&m) && k.is_multiple_of(slices * 64);
    let large = n >= 4096 && k >= 4096;
    let pays = large && (k >= 2 * n || (k == n && m <= 16));
    let qkv_shape = large && n > k && n <= 2 * k;
    let narrow = large && n <= 2 * k;
    match mode {
        SplitK::Every if takes => slices,
        SplitK::Auto if takes && pays => slices,
        SplitK::Qkv if takes && (pays || qkv_shape) => slices,
        SplitK::Narrow if takes && narrow => slices,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_k_takes_the_down_projection_and_a_few_rows_of_the_o_projection() {
        use super::{split_k_splits, SplitK};
        // Llama-3.1-8B: down 4096 x 14336, o 4096 x 4096, QKV 6144 x 4096, gate_up 28672 x 4096.
        for m in [2, 8, 32, 64] {
            assert_eq!(split_k_splits(SplitK::Auto, 2, m, 14336, 4096), 2, "down at {m} rows");
        }
        for (m, want) in [(2, 2), (16, 2), (17, 1), (32, 1)] {
            assert_eq!(split_k_splits(SplitK::Auto, 2, m, 4096, 4096), want, "o at {m} rows");
        }
        assert_eq!(split_k_splits(SplitK::Auto, 2, 8, 4096, 6144), 1, "QKV");
        assert_eq!(split_k_splits(SplitK::Auto, 2, 8, 4096, 28672), 1, "gate_up");
        // One row is the GEMV's, more than 64 cuBLAS's own; small models are not split.
        assert_eq!(split_k_splits(SplitK::Auto, 2, 1, 14336, 4096), 1);
        assert_eq!(split_k_splits(SplitK::Auto, 2, 65, 14336, 4096), 1);
        assert_eq!(split_k_splits(SplitK::Auto, 2, 8, 1536, 576), 1);
        // Off splits nothing; Every splits what the slices divide, whatever the shape.
        assert_eq!(split_k_splits(SplitK::Off, 2, 8, 14336, 4096), 1);
        assert_eq!(split_k_splits(SplitK::Every, 2, 8, 1536, 576), 2);
        assert_eq!(split_k_splits(SplitK::Every, 2, 8, 100, 576), 1, "K not a multiple of 128");
        // Qkv: Auto's shapes and the QKV product, not gate_up, one row or past 64.
        for m in [2, 16, 32, 64] {
            assert_eq!(split_k_splits(SplitK::Qkv, 2, m, 4096, 6144), 2, "QKV at {m} rows");
            assert_eq!(split_k_splits(SplitK::Qkv, 2, m, 14336, 4096), 2, "down at {m} rows");
            assert_eq!(split_k_splits(SplitK::Qkv, 2, m, 4096, 28672), 1, "gate_up at {m} rows");
        }
        assert_eq!(split_k_splits(SplitK::Qkv, 2, 32, 4096, 4096), 1, "o at 32 rows");
        assert_eq!(split_k_splits(SplitK::Qkv, 2, 1, 4096, 6144), 1);
        assert_eq!(split_k_splits(SplitK::Qkv, 2, 65, 4096, 6144), 1);
        assert_eq!(split_k_splits(SplitK::Qkv, 2, 8, 2048, 3072), 1, "the 1B QKV, not measured");
        // Narrow: QKV, o and down at every row count of 2-64, never gate_up or small models.
        for m in [2, 32, 64] {
            for (k, n) in [(4096, 6144), (4096, 4096), (14336, 4096)] {
                assert_eq!(split_k_splits(SplitK::Narrow, 2, m, k, n), 2, "{n} x {k} at {m} rows");
            }
            assert_eq!(split_k_splits(SplitK::Narrow, 2, m, 4096, 28672), 1, "gate_up at {m} rows");
        }
        assert_eq!(split_k_splits(SplitK::Narrow, 2, 8, 1536, 576), 1);
        // Four slices where K holds four multiples of 64; none where it does not, or with one.
        assert_eq!(split_k_splits(SplitK::Qkv, 4, 32, 4096, 6144), 4);
        assert_eq!(split_k_splits(SplitK::Auto, 4, 32, 14336, 4096), 4);
        assert_eq!(split_k_splits(SplitK::Every, 4, 8, 1536, 576), 4);
        assert_eq!(split_k_splits(SplitK::Every, 3, 8, 4096, 4096), 1, "4096 is not a multiple of 3 x 64");
        assert_eq!(split_k_splits(SplitK::Every, 1, 8, 4096, 4096), 1);
    }

    use super::*;

    #[test]
    fn block_tables_pack_row_major_with_padding() {
        let mut batch = ForwardBatch::new(16, 64);
        batch.push_seq(&[1; 20], 0, &[5, 9], true).unwrap();
        batch.push_seq(&[1], 40, &[1, 2, 3], true).unwrap();
        let (packed, max_blocks) = pack_block_tables(&batch);
        assert_eq!(max_blocks, 3);
        assert_eq!(packed, vec![5, 9, 0, 1, 2, 3]);
    }

    #[test]
    fn mixed_batches_tile_prefill_chunks_and_list_decode_rows() {
        let mut batch = ForwardBatch::new(16, 64);
        batch.push_seq(&[1], 40, &[1, 2, 3], true).unwrap(); // row 0: decode
        batch.push_seq(&[1; 130], 0, &[4; 9], true).unwrap(); // rows 1..131: prefill, 3 tiles
        batch.push_seq(&[1; 37], 200, &[5; 15], true).unwrap(); // rows 131..168: chunk at 200
        batch.push_seq(&[1], 7, &[6], true).unwrap(); // row 168: decode
        let plan = plan_attention(&batch, AttentionPath::Mixed);
        // Longest context first: the chunk (last position 236), then the prefill's tiles.
        assert_eq!(plan.tiles, vec![[2, 131, 37], [1, 129, 2], [1, 65, 64], [1, 1, 64]]);
        assert_eq!(plan.decode_rows, Some(vec![0, 168]));
        assert_eq!(plan.decode_context, 41);
        assert_eq!(plan.num_decode(batch.num_tokens()), 2);
        assert_eq!(plan.tile_words().take(6).collect::<Vec<_>>(), vec![2, 131, 37, 1, 129, 2]);
    }

    #[test]
    fn decode_only_batches_launch_the_decode_kernel_over_every_row() {
        let mut batch = ForwardBatch::new(16, 64);
        batch.push_seq(&[1], 40, &[1, 2, 3], true).unwrap();
        batch.push_seq(&[1], 0, &[4], true).unwrap();
        let plan = plan_attention(&batch, AttentionPath::Mixed);
        assert_eq!(plan, AttentionPlan { tiles: vec![], decode_rows: None, decode_context: 41 });
        assert_eq!(plan.num_decode(2), 2);
        // A batch of prefills only: no decode launch at all.
        let mut prefill = ForwardBatch::new(16, 64);
        prefill.push_seq(&[1; 64], 0, &[1; 4], true).unwrap();
        let plan = plan_attention(&prefill, AttentionPath::Mixed);
        assert_eq!((plan.tiles.len(), plan.num_decode(64)), (1, 0));
    }

    #[test]
    fn forced_paths_send_every_sequence_to_one_kernel() {
        let mut batch = ForwardBatch::new(16, 64);
        batch.push_seq(&[1; 3], 0, &[1], true).unwrap();
        batch.push_seq(&[1], 9, &[2], true).unwrap();
        let all_prefill = plan_attention(&batch, AttentionPath::Prefill);
        assert_eq!(all_prefill.tiles, vec![[1, 3, 1], [0, 0, 3]]);
        assert_eq!(all_prefill.num_decode(4), 0);
        let all_decode = plan_attention(&batch, AttentionPath::Decode);
        assert_eq!((all_decode.tiles.len(), all_decode.decode_rows, all_decode.decode_context), (0, None, 10));
    }

    #[test]
    fn splits_trade_shorter_blocks_against_waves() {
        let plan = AttentionSplit::plan;
        // The H100's slots: 3 blocks of either head dim on each of 132 SMs.
        let slots = 3 * 132;
        assert_eq!(plan(100, 3, slots), AttentionSplit::NONE, "two tiles: a reduction costs more than it saves");
        // Batch 1: as many one-tile partitions as the context has tiles (one wave either way).
        assert_eq!(plan(512, 3, slots), AttentionSplit { splits: 8, partition: 64 });
        assert_eq!(plan(2048, 8, slots), AttentionSplit { splits: 32, partition: 64 });
        // 64 sequences x 8 KV heads = 512 blocks on 396 slots: 2 splits would run 2.6 waves of
        // 16 tiles, 3 run 3.9 waves of 11.
        assert_eq!(plan(2048, 512, slots), AttentionSplit { splits: 3, partition: 704 });
        // A grid of several waves already: no split.
        assert_eq!(plan(512, 256 * 8, slots), AttentionSplit::NONE);
    }

    #[test]
    fn partitions_always_cover_the_planned_context() {
        for max_context in [1, 31, 64, 65, 256, 257, 1000, 1536, 1537, 2048, 8192, 131_072] {
            for work_items in [1, 3, 24, 192, 512, 768, 4096] {
                let split = AttentionSplit::plan(max_context, work_items, 396);
                assert!(split.splits * split.partition >= max_context, "{max_context} {work_items}: {split:?}");
                assert!(split.splits == 1 || split.partition.is_multiple_of(DECODE_TILE_KEYS), "whole tiles: {split:?}");
                assert!(split.splits == 1 || (split.splits - 1) * split.partition < max_context, "no empty split: {split:?}");
            }
            for splits in 1..=40 {
                let split = AttentionSplit::covering(splits, max_context);
                assert!(split.splits * split.partition >= max_context);
                assert!(split.splits <= splits.max(1));
            }
        }
    }

    #[test]
    fn decode_launch_constants_match_the_kernel_source() {
        // The host sizes shared memory and split-K from these; the kernel defines them again.
        let source = pagedserve_kernels::MODULES.iter().find(|m| m.name == "paged_attention").unwrap().source;
        assert!(source.contains(&format!("#define DC_WARPS {}", DECODE_THREADS / 32)));
        assert!(source.contains("#define DC_N (DC_WARPS * 16)"));
        assert_eq!(DECODE_TILE_KEYS, DECODE_THREADS as usize / 32 * 16, "16 keys per warp");
        assert!(source.contains(&format!("#define DC_PAD {DECODE_ROW_PAD}")));
        assert!(source.contains(&format!("#define DC_TABLE {DECODE_TABLE_ENTRIES}")));
        for head_dim in crate::cuda::DECODE_HEAD_DIMS {
            assert!(source.contains(&format!("DECODE_KERNEL({head_dim}, {})", decode_stages(head_dim, KvCacheDtype::Auto))), "{head_dim}");
            let stages = decode_stages(head_dim, KvCacheDtype::Fp8E4M3);
            assert!(source.contains(&format!("DECODE_FP8_KERNEL({head_dim}, {stages})")), "{head_dim}");
        }
        // The FP8 rows' strides (`DecodeRows`), which the host's shared-memory size repeats.
        assert!(source.contains("static constexpr int K = FP8 ? HD + (HD == 64 ? 0 : 16) : (HD + DC_PAD) * 2;"));
        assert!(source.contains("static constexpr int V = FP8 ? HD + 16 : (HD + DC_PAD) * 2;"));
    }

    #[test]
    fn mmq_launch_constants_match_the_kernel_source() {
        // The host sizes MMQ's grid, threads and shared memory from these; the kernel defines them again.
        let source = pagedserve_kernels::MODULES.iter().find(|m| m.name == "ggml").unwrap().source;
        assert!(source.contains(&format!("#define MMQ_ROWS {MMQ_ROWS}")));
        assert!(source.contains(&format!("#define MMQ_STAGES {MMQ_STAGES}")));
        assert!(source.contains(&format!("__launch_bounds__(TOKENS == 64 ? {} : {})", mmq_threads(64), mmq_threads(16))));
    }

    #[test]
    fn moe_launch_constants_match_the_kernel_source() {
        let source = pagedserve_kernels::MODULES.iter().find(|m| m.name == "moe").unwrap().source;
        assert!(source.contains(&format!("#define MOE_BM {MOE_TILE_ROWS}")));
        assert!(source.contains(&format!("#define MOE_BN {MOE_TILE_COLS}")));
        assert!(source.contains(&format!("#define MOE_THREADS {MOE_THREADS}")));
        // One token, 8 experts, top-2: at most two tiles; 300 tokens: one tile per 64 plus one
        // partial tile per expert.
        assert_eq!(moe_most_tiles(2, 8), 3);
        assert_eq!(moe_most_tiles(600, 8), 10 + 8);
    }

    #[test]
    fn attention_kernels_and_their_shared_memory() {
        use KvCacheDtype::{Auto, Fp8E4M3};
        assert_eq!(decode_kernel_name(64, Auto), "paged_attention_hd64");
        assert_eq!(decode_kernel_name(128, Auto), "paged_attention_hd128");
        assert_eq!(decode_kernel_name(128, Fp8E4M3), "paged_attention_fp8_hd128");
        assert_eq!(prefill_kernel_name(64, Auto), "prefill_attention_hd64");
        assert_eq!(prefill_kernel_name(64, Fp8E4M3), "prefill_attention_fp8_hd64");
        // Stages of 64 keys and 64 values, rows padded by 8: two at head dim 128 (70 KB, three
        // blocks per H100 SM), four at 64 (74 KB); the merge of 4 warps x 16 rows fits inside.
        // Plus 1 KB of block table: three blocks still fit an SM's 228 KB (1 KB reserved each).
        assert_eq!(decode_shared_bytes(128, Auto), 2 * 2 * 64 * 136 * 2 + 256 * 4);
        assert_eq!(decode_shared_bytes(64, Auto), 4 * 2 * 64 * 72 * 2 + 256 * 4);
        assert!(3 * (decode_shared_bytes(64, Auto) + 1024) <= 228 * 1024);
        // Over an FP8 cache: twice the stages of raw rows (keys 144 bytes apart, values 144; at
        // head dim 64, 64 and 80), about the same bytes, so as many blocks fit.
        assert_eq!(decode_shared_bytes(128, Fp8E4M3), 4 * 64 * (144 + 144) + 256 * 4);
        assert_eq!(decode_shared_bytes(64, Fp8E4M3), 8 * 64 * (64 + 80) + 256 * 4);
        for head_dim in [64, 128] {
            assert!(3 * (decode_shared_bytes(head_dim, Fp8E4M3) + 1024) <= 228 * 1024, "{head_dim}");
        }
        // Gemma's head dim 256: two stages (135 KB), and the prefill tiles past the static limit.
        assert_eq!(decode_shared_bytes(256, Auto), 2 * 2 * 64 * 264 * 2 + 256 * 4);
        assert!(decode_shared_bytes(256, Fp8E4M3) + 1024 <= 227 * 1024);
        assert_eq!(prefill_shared_bytes(256, Auto), 2 * 64 * 264 * 2);
        assert_eq!(prefill_shared_bytes(128, Fp8E4M3), 2 * 64 * 136 * 2 + 2 * 64 * 128);
        let prefill = pagedserve_kernels::MODULES.iter().find(|m| m.name == "prefill_attention").unwrap().source;
        assert!(prefill.contains(&format!("#define PF_PAD {DECODE_ROW_PAD}")) && prefill.contains(&format!("#define PF_N {PREFILL_TILE}")));
        for head_dim in crate::cuda::DECODE_HEAD_DIMS {
            assert!(prefill.contains(&format!("PREFILL_KERNEL({head_dim})")), "{head_dim}");
            assert!(prefill.contains(&format!("PREFILL_FP8_KERNEL({head_dim})")), "{head_dim}");
            // The warps' merge reuses the ring.
            for cache in [Auto, Fp8E4M3] {
                assert!(decode_shared_bytes(head_dim, cache) >= 4 * 16 * (head_dim + 2) * 4, "{head_dim} {cache:?}");
            }
        }
    }

    #[test]
    fn gemv_takes_up_to_eight_aligned_rows_that_fit_shared_memory() {
        use WeightFormat::{Bf16, Fp8, Ggml};
        assert!(gemv_supports(1, 576, Bf16) && gemv_supports(8, 1536, Bf16) && gemv_supports(3, 576, Bf16));
        assert!(!gemv_supports(0, 576, Bf16) && !gemv_supports(9, 576, Bf16), "0 rows, or cuBLAS's batch sizes");
        assert!(!gemv_supports(1, 100, Bf16), "k not a multiple of 8: no 16-byte vectors");
        assert!(gemv_supports(1, 584, Bf16) && !gemv_supports(1, 584, Fp8), "16 FP8 weights per vector");
        assert!(gemv_supports(8, 6144, Bf16) && !gemv_supports(8, 6152, Bf16), "8 rows x 6144 x 2 bytes is 96 KB");
        assert!(gemv_supports(1, 49152, Bf16) && !gemv_supports(1, 49160, Bf16));
        assert!(gemv_supports(2, 14336, Bf16) && !gemv_supports(4, 14336, Bf16), "the 8B down projection up to 2 rows");
        assert!(gemv_prefers(1, 4096, 128_256, Bf16) && gemv_prefers(1, 14336, 4096, Bf16), "weight streams at one row");
        assert!(!gemv_prefers(2, 4096, 28672, Bf16) && !gemv_prefers(8, 4096, 6144, Bf16), "2+ rows of a large weight: cuBLAS");
        assert!(gemv_prefers(8, 576, 3072, Bf16) && gemv_prefers(2, 1536, 576, Bf16), "small weights at any supported row count");
        assert!(!gemv_prefers(1, 576, 49152, Bf16), "a large weight of short rows: cuBLAS");
        assert!(gemv_prefers(1, 4096, 28672, Fp8) && gemv_prefers(1, 576, 49152, Fp8), "FP8 streams one row");
        assert!(!gemv_prefers(2, 4096, 28672, Fp8) && gemv_prefers(8, 576, 3072, Fp8), "then cuBLASLt, but for small weights");
        let q4k = Ggml(crate::model::gguf::GgmlType::Q4_K);
        assert!(gemv_prefers(4, 4096, 28672, q4k) && !gemv_prefers(5, 4096, 28672, q4k), "Q4_K: the GEMV up to 4 rows, then MMQ");
        let source = pagedserve_kernels::MODULES
            .iter()
            .find(|m| m.name == "gemv")
            .unwrap()
            .source;
        assert!(source.contains(&format!("static constexpr int value = FP8 ? {} : {};", Fp8.rows_per_warp(), Bf16.rows_per_warp())));
        assert_eq!(gemv_shared_bytes(3, 576, Bf16), 4 * 576 * 2, "3 rows run in the 4-row tile");
        // The ring beside the staged input: the kernel's stages times vectors times lanes times 16 bytes.
        let define = |name: &str| -> usize {
            let at = source.find(&format!("#define {name} ")).unwrap_or_else(|| panic!("no {name} in gemv.cu")) + name.len() + 9;
            source[at..].split_whitespace().next().unwrap().parse().unwrap()
        };
        assert_eq!(define("GEMV_STAGES"), GEMV_STAGES);
        assert_eq!(define("GEMV_STAGE_VECTORS") * 32 * 16, GEMV_STAGE_BYTES);
        let h200 = 227 * 1024;
        let ring = GEMV_RING_BYTES_PER_WARP;
        assert_eq!(gemv_block_fit(1, 4096, Bf16, 16, h200), Some((16, 8192 + 16 * ring)), "one row: every warp gets its ring");
        assert_eq!(gemv_block_fit(1, 14336, Bf16, 16, h200), Some((16, 28672 + 16 * ring)), "the 8B down projection");
        assert_eq!(gemv_block_fit(8, 4096, Fp8, 16, h200), Some((13, 65536 + 13 * ring)), "8 staged rows leave room for 13");
        assert_eq!(gemv_block_fit(1, 576, Bf16, 4, h200), Some((4, 1152 + 4 * ring)), "a small product asks for fewer");
        assert_eq!(gemv_block_fit(8, 4096, Bf16, 16, 99 * 1024), None, "sm_86: fewer than 4 rings beside 64 KB of input");
        assert_eq!(gemv_block_fit(1, 4096, Bf16, 16, 99 * 1024), Some((7, 8192 + 7 * ring)));
        assert_eq!(gemv_block_fit(1, 4096, Ggml(crate::model::gguf::GgmlType::Q4_K), 16, h200), Some((16, 4096 + 1024)), "no ring from GGUF blocks");
        assert!(ggml_one_row_warps(6144, 2112), "the 8B QKV: 1.45 rounds of row pairs, 2.9 of rows");
        assert!(!ggml_one_row_warps(4096, 2112) && !ggml_one_row_warps(28672, 2112), "o, down, gate-up: both fill their rounds");
        for name in GGML_ONE_ROW_WARP_KERNELS {
            assert!(pagedserve_kernels::MODULES.iter().any(|m| m.functions.contains(&name)), "{name} is not a kernel");
        }
        assert_eq!(gemv_kernel_name(GemvMode::Plain, 1, Bf16), "gemv_m1");
        assert_eq!(gemv_kernel_name(GemvMode::SiluMul, 3, Bf16), "gemv_silu_m4");
        assert_eq!(gemv_kernel_name(GemvMode::AddNorm, 5, Bf16), "gemv_norm_m8");
        assert_eq!(gemv_kernel_name(GemvMode::AddNorm, 2, Fp8), "gemv_fp8_norm_m2");
        // One warp per row while the grid is small; capped at one resident wave (132 SMs).
        assert_eq!(gemv_grid(576, 16, 132, 1), 36);
        assert_eq!(gemv_grid(1001, 16, 132, 1), 63);
        assert_eq!(gemv_grid(49152, 16, 132, 1), 132);
        assert_eq!(gemv_grid(49152, 16, 132, 2), 264);
        assert_eq!(gemv_grid(1, 4, 132, 0), 1, "an occupancy of 0 still launches");
        // Small products get smaller blocks, so they spread over the multiprocessors.
        assert_eq!(gemv_block_warps(576, 132), 8);
        assert_eq!(gemv_block_warps(100, 132), 4);
        assert_eq!(gemv_block_warps(4096, 132), 16);
        assert_eq!(gemv_grid(576, gemv_block_warps(576, 132), 132, 1), 72);
        assert_eq!(gemv_kernels().len(), 8 * 13, "bf16, FP8 and six ggml types, 3 modes x 4 row counts and the merge at one row");
        assert!(gemv_kernels().iter().any(|(name, _)| name == "gemv_q4_k_merge_m1") && gemv_kernels().iter().any(|(name, _)| name == "gemv_fp8_merge_m1"));
        let q4k = WeightFormat::Ggml(GgmlType::Q4_K);
        assert!(gemv_supports(1, 14336, q4k) && gemv_supports(8, 14336, q4k) && !gemv_supports(9, 4096, q4k));
        assert!(!gemv_supports(1, 4000, q4k), "whole super-blocks");
        assert!(gemv_supports(1, 576, WeightFormat::Ggml(GgmlType::Q4_1)), "32-value blocks");
        assert_eq!(gemv_shared_bytes(1, 576, WeightFormat::Ggml(GgmlType::Q4_1)), 640 + 18 * 8, "int8 rows in whole 128 bytes");
        assert_eq!(gemv_shared_bytes(1, 4096, q4k), 4096 + 1024);
        assert_eq!(gemv_shared_bytes(3, 4096, q4k), 4 * (4096 + 1024));
        assert!(gemv_prefers(1, 4096, 6144, q4k) && gemv_prefers(4, 4096, 6144, q4k) && !gemv_prefers(5, 4096, 6144, q4k), "MMQ from 5 rows");
        assert!(gemv_prefers(8, 4096, 100, q4k), "small weights: the GEMV and its fused staging");
        assert!(gemv_prefers(8, 4096, 6144, WeightFormat::Ggml(GgmlType::Q6_K)), "no MMQ for Q6_K");
        assert_eq!(gemv_kernel_name(GemvMode::SiluMul, 1, q4k), "gemv_q4_k_silu_m1");
        assert_eq!(gemv_kernel_name(GemvMode::AddNorm, 3, WeightFormat::Ggml(GgmlType::Q8_0)), "gemv_q8_0_norm_m4");
        assert_eq!(WeightFormat::kept(GgmlType::Q2_K), None);
        let defined: Vec<&str> = pagedserve_kernels::MODULES.iter().flat_map(|m| m.functions.iter().copied()).collect();
        for (name, _) in gemv_kernels() {
            assert!(defined.contains(&name.as_str()), "{name} is not a kernel of any module");
        }
    }

    #[test]
    fn mmq_takes_q4_k_batches_and_splits_narrow_products_along_k() {
        assert!(mmq_supports(GgmlType::Q4_K, 9, 4096) && mmq_supports(GgmlType::Q4_K, 64, 14336));
        assert!(!mmq_supports(GgmlType::Q4_K, 65, 4096) && !mmq_supports(GgmlType::Q4_K, 16, 4000), "65 rows; no whole super-blocks");
        assert!(!mmq_supports(GgmlType::Q6_K, 16, 4096) && mmq_supports(GgmlType::Q8_0, 16, 4096), "not Q6_K's 210-byte blocks");
        assert_eq!((mmq_tokens(9), mmq_tokens(16), mmq_tokens(17), mmq_tokens(64)), (16, 16, 32, 64));
        assert_eq!(mmq_input_bytes(9, 4096), 16 * 4096 + 16 * 128 * 8);
        assert_eq!(mmq_shared_bytes(GgmlType::Q4_K, 64), 3 * (64 * 144 + 64 * 320), "89 KB: two blocks a multiprocessor");
        assert_eq!(mmq_kernel_name(GgmlType::Q4_K, 20), "mmq_q4_k_t32");
        assert_eq!((mmq_threads(16), mmq_threads(32), mmq_threads(33)), (128, 128, 256), "token halves at 64");
        let defined: Vec<&str> = pagedserve_kernels::MODULES.iter().flat_map(|m| m.functions.iter().copied()).collect();
        for ty in WeightFormat::KEPT_GGML.into_iter().filter(|&ty| mmq_supports(ty, 16, 256)) {
            for m in [16, 32, 64] {
                assert!(defined.contains(&mmq_kernel_name(ty, m).as_str()));
                assert!(mmq_shared_bytes(ty, m) <= 227 * 1024);
            }
        }
        // The 8B shape on 132 multiprocessors, two blocks each wanted: the 4096-row products (64
        // blocks of rows) split, gate_up (448) does not.
        assert_eq!(mmq_split(4096, 16, 264), MmqSplit { splits: 4, per_split: 4 }, "o_proj: at least 4 super-blocks a split");
        assert_eq!(mmq_split(4096, 56, 264), MmqSplit { splits: 5, per_split: 12 }, "down: the last split is shorter");
        assert_eq!(mmq_split(6144, 16, 264), MmqSplit { splits: 3, per_split: 6 });
        assert_eq!(mmq_split(28672, 16, 264), MmqSplit { splits: 1, per_split: 16 });
        assert_eq!(mmq_split(960, 2, 264), MmqSplit { splits: 1, per_split: 2 }, "too short to split");
        for (n, sbs, wanted) in [(4096, 56, 264), (100, 57, 1000), (64, 9, 7), (1, 1, 0)] {
            let s = mmq_split(n, sbs, wanted);
            assert!(s.splits * s.per_split >= sbs && (s.splits - 1) * s.per_split < sbs, "every super-block once, no empty split: {s:?}");
        }
        // Partials need m·n floats each beside the input; without room, no split.
        assert_eq!(mmq_plan(16, 4096, 4096, 1 << 30, 264).splits, 4);
        assert_eq!(mmq_plan(16, 4096, 4096, mmq_input_bytes(16, 4096) + 2 * 16 * 4096 * 4, 264).splits, 2);
        assert_eq!(mmq_plan(16, 4096, 4096, mmq_input_bytes(16, 4096), 264).splits, 1);
    }

    #[test]
    fn graph_buckets_round_up() {
        assert_eq!(graph_bucket(1), Some(1));
        assert_eq!(graph_bucket(3), Some(4));
        assert_eq!(graph_bucket(65), Some(96));
        assert_eq!(graph_bucket(256), Some(256));
        assert_eq!(graph_bucket(257), None);
        assert_eq!(row_threads(576), 576);
        assert_eq!(row_threads(4096), 1024);
        assert_eq!(row_threads(1), 32);
    }

    #[test]
    fn norm_and_gated_grids_cover_their_rows() {
        // `fused_add_rmsnorm` holds a row in registers when it fits 16 values a thread; every
        // 8-aligned width up to 16,384 must, so that no model's norm takes the scalar loop.
        for width in (8..=16384).step_by(8) {
            let c = norm_config(3, width);
            assert_eq!(c.grid_dim, (3, 1, 1));
            assert!(c.block_dim.0 as usize * 16 >= width && c.block_dim.0 % 32 == 0, "width {width}");
        }
        assert_eq!(norm_config(32, 4096).block_dim.0, 512, "8B: one register chunk a thread");
        // The gated activations: enough 256-thread blocks a row, 8 values a thread.
        for inter in [1, 1001, 1536, 2048, 2049, 14336, 28672] {
            let c = gated_config(5, inter);
            assert_eq!((c.grid_dim.0, c.block_dim.0), (5, 256));
            assert!(c.grid_dim.1 as usize * 256 * 8 >= inter && (c.grid_dim.1 as usize - 1) * 256 * 8 < inter.max(1), "inter {inter}");
        }
        assert_eq!(gated_config(32, 14336).grid_dim, (32, 7, 1), "8B at 32 rows: 224 blocks, not 32");
    }

    #[test]
    fn row_range_switches_parse() {
        let parse = |v: Option<&str>| parse_row_range("X", v, 2..=64, 64);
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some("off")), Ok(None));
        assert_eq!(parse(Some("on")), Ok(Some(2..=64)));
        assert_eq!(parse(Some("8-32")), Ok(Some(8..=32)));
        for bad in ["0-8", "9-8", "2-65", "8", "a-b", "yes"] {
            let e = parse(Some(bad)).unwrap_err();
            assert!(e.contains("X is off, on or a row range A-B within 1-64"), "{e}");
        }
    }
}
