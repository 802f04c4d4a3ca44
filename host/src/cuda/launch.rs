//! Launch arithmetic of the GPU forward, kept free of CUDA calls so it is unit-tested on machines
//! without a GPU: how a batch's block tables are packed for the kernels, how many split-K
//! partitions attention uses, and which CUDA-graph bucket a decode batch falls in.

use crate::runner::ForwardBatch;

/// Threads of one attention block (`WARPS * 32` in `kernels/paged_attention.cu`).
pub const ATTENTION_THREADS: u32 = 256;

/// Positions each split-K partition of the attention kernel covers.
pub const ATTENTION_PARTITION: usize = 512;

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

/// Split-K partitions for attention over contexts of at most `max_context` positions, for a
/// launch of `work_items` (token, KV head) blocks on `num_sms` multiprocessors: enough splits that
/// the grid has about four blocks per multiprocessor (a memory-bound kernel needs many warps in
/// flight), but never more than one per `ATTENTION_PARTITION` positions.
pub fn attention_splits(max_context: usize, work_items: usize, num_sms: usize) -> usize {
    let partitions = max_context.div_ceil(ATTENTION_PARTITION).max(1);
    let wanted = (4 * num_sms).div_ceil(work_items.max(1));
    wanted.clamp(1, partitions)
}

/// The attention kernel instantiated for this head dimension and grouped-query group size: the
/// group is rounded up to a power of two (1, 2, 4, 8) so registers are sized for it.
pub fn attention_kernel_name(head_dim: usize, group: usize) -> String {
    format!("paged_attention_hd{head_dim}_g{}", group.next_power_of_two())
}

/// Batch sizes CUDA graphs are captured for; a decode batch runs in the smallest bucket that
/// holds it (padded with idle rows).
pub const GRAPH_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

pub fn graph_bucket(batch_size: usize) -> Option<usize> {
    GRAPH_BUCKETS.iter().copied().find(|&b| b >= batch_size)
}

/// Threads per block for a row-wise kernel over `width` elements: a multiple of 32, at most 1024.
pub fn row_threads(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 1024) as u32
}

#[cfg(test)]
mod tests {
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
    fn splits_follow_context_unless_the_grid_is_full() {
        assert_eq!(attention_splits(100, 8, 132), 1, "short context: one partition");
        assert_eq!(attention_splits(2048, 8, 132), 4, "few blocks: one split per partition");
        assert_eq!(attention_splits(2049, 8, 132), 5);
        // 64 sequences x 8 KV heads = 512 blocks on 132 SMs: two splits reach ~4 blocks per SM.
        assert_eq!(attention_splits(2048, 512, 132), 2);
        assert_eq!(attention_splits(2048, 4096, 132), 1);
    }

    #[test]
    fn attention_kernels_round_the_group_up() {
        assert_eq!(attention_kernel_name(64, 3), "paged_attention_hd64_g4");
        assert_eq!(attention_kernel_name(128, 4), "paged_attention_hd128_g4");
        assert_eq!(attention_kernel_name(64, 7), "paged_attention_hd64_g8");
        assert_eq!(attention_kernel_name(128, 1), "paged_attention_hd128_g1");
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
}
