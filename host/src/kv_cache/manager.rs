//! The KV-cache manager: the only code that gives sequences blocks and takes them back. On top of
//! the block pool it keeps, per sequence, an append-only block table, and it implements automatic
//! prefix caching (full blocks keyed by a chained hash of their tokens), copy-on-write sharing for
//! forked sequences (the `n` samples of one request) and usage statistics.
//!
//! For a model whose every layer attends through a sliding window (Mistral, Phi-3), blocks that
//! lie wholly before the window of a sequence's next position are given back as soon as they
//! are (`commit`): no later query can read them. Their block-table entries stay in place (tables
//! are append-only) but are stale: `SeqBlocks::released` counts them, and they are never freed,
//! forked or read again.
//!
//! Running out of blocks is `false`/`None`, never an error: the scheduler decides who yields.

use std::hash::{Hash, Hasher};

use super::{BlockHash, BlockId, BlockPool};

/// The blocks one sequence holds.
#[derive(Debug, Default)]
pub struct SeqBlocks {
    /// Block table: logical block `i` lives in physical block `blocks[i]`.
    blocks: Vec<BlockId>,
    /// Chained hashes of the leading full blocks that are known to hold their tokens.
    hashes: Vec<BlockHash>,
    /// Leading blocks already given back (outside a sliding window); their entries are stale.
    released: usize,
}

impl SeqBlocks {
    /// The block table; its first `released()` entries are stale (see the module doc).
    pub fn table(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Entries of the block table, stale ones included.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks this sequence holds a reference to.
    pub fn num_held(&self) -> usize {
        self.blocks.len() - self.released
    }

    /// Leading table entries already given back.
    pub fn released(&self) -> usize {
        self.released
    }
}

/// Prefix-cache counters, in tokens, as vLLM reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub queries: u64,
    pub hits: u64,
}

#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    prefix_caching: bool,
    stats: PrefixCacheStats,
    /// Positions every layer's attention sees (itself included), when all are windowed.
    sliding_window: Option<usize>,
}

/// Hash of a full block given the hash of the blocks before it. `DefaultHasher::new()` has fixed
/// keys, so equal prefixes hash equally for the life of the process.
fn chain_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0);
        KvCacheManager {
            pool: BlockPool::new(num_blocks),
            block_size,
            prefix_caching,
            stats: PrefixCacheStats::default(),
            sliding_window: None,
        }
    }

    /// Gives back blocks wholly before each sequence's window (`ModelConfig::all_layers_sliding`).
    pub fn with_sliding_window(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window.filter(|&w| w > 0);
        self
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Every block's state (`BlockPool::states`).
    pub fn block_states(&self) -> Vec<u8> {
        self.pool.states()
    }

    /// Share of blocks held by sequences (cached-but-free blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.pool.num_blocks() == 0 {
            return 0.0;
        }
        self.pool.num_used() as f64 / self.pool.num_blocks() as f64
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed for a sequence holding `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// For a sequence that holds no blocks yet: takes the longest run of cached full blocks that
    /// starts its `tokens`, and returns how many tokens they cover. At least one token is left to
    /// compute, so the sequence's next pass still yields logits.
    pub fn match_prefix(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) -> usize {
        assert!(seq.blocks.is_empty(), "match_prefix on a sequence that holds blocks");
        if !self.prefix_caching {
            return 0;
        }
        self.stats.queries += tokens.len() as u64;
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = chain_hash(parent, chunk);
            let Some(block) = self.pool.take_cached(hash) else { break };
            seq.blocks.push(block);
            seq.hashes.push(hash);
            parent = Some(hash);
        }
        let hit = seq.blocks.len() * self.block_size;
        self.stats.hits += hit as u64;
        hit
    }

    /// Makes `seq` able to hold `num_tokens` tokens, where the pass about to run writes positions
    /// from `first_new` on. If the block that `first_new` falls in is shared with a forked
    /// sequence and already partly written, `seq` gets a private copy first: the pair
    /// (source, destination) is pushed to `copies`, and the backend must copy it before the pass.
    /// All or nothing: returns `false` and changes nothing if too few blocks are free.
    pub fn allocate(
        &mut self,
        seq: &mut SeqBlocks,
        first_new: usize,
        num_tokens: usize,
        copies: &mut Vec<(BlockId, BlockId)>,
    ) -> bool {
        let needed = self.blocks_for(num_tokens).saturating_sub(seq.blocks.len());
        let logical = first_new / self.block_size;
        let copy_on_write = !first_new.is_multiple_of(self.block_size)
            && logical < seq.blocks.len()
            && self.pool.ref_count(seq.blocks[logical]) > 1;
        let Some(new_blocks) = self.pool.allocate(needed + usize::from(copy_on_write)) else {
            return false;
        };
        let mut new_blocks = new_blocks.into_iter();
        if copy_on_write {
            let private = new_blocks.next().expect("allocated above");
            let shared = std::mem::replace(&mut seq.blocks[logical], private);
            self.pool.release([shared]);
            copies.push((shared, private));
        }
        seq.blocks.extend(new_blocks);
        true
    }

    /// Records that the first `num_computed` of `tokens` are now in the cache: blocks that just
    /// became full join the prefix cache, and with a sliding window, blocks no query from
    /// position `num_computed` on can see are given back.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], num_computed: usize) {
        if self.prefix_caching {
            let full = (num_computed / self.block_size).min(seq.blocks.len());
            while seq.hashes.len() < full {
                let i = seq.hashes.len();
                let hash = chain_hash(seq.hashes.last().copied(), &tokens[i * self.block_size..(i + 1) * self.block_size]);
                if i >= seq.released {
                    self.pool.register(seq.blocks[i], hash);
                }
                seq.hashes.push(hash);
            }
        }
        if let Some(window) = self.sliding_window {
            // The query at `num_computed` sees positions from `num_computed + 1 - window` on.
            let first_seen = (num_computed + 1).saturating_sub(window);
            let outside = (first_seen / self.block_size).min(seq.blocks.len());
            if outside > seq.released {
                self.pool.release(seq.blocks[seq.released..outside].iter().rev().copied());
                seq.released = outside;
            }
        }
    }

    /// A new sequence sharing every held block of `seq` (copy-on-write happens in `allocate`).
    pub fn fork(&mut self, seq: &SeqBlocks) -> SeqBlocks {
        for &b in &seq.blocks[seq.released..] {
            self.pool.retain(b);
        }
        SeqBlocks { blocks: seq.blocks.clone(), hashes: seq.hashes.clone(), released: seq.released }
    }

    /// Gives back every held block of `seq`, last first so its tail is evicted before its prefix.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        self.pool.release(seq.blocks.drain(seq.released..).rev());
        seq.blocks.clear();
        seq.hashes.clear();
        seq.released = 0;
    }

    /// Panics if the pool's invariants are broken (tests and debug checks).
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn second_sequence_with_same_prefix_hits_full_blocks() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let prompt = tokens(10, 0);
        let mut a = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut a, &prompt), 0);
        assert!(kv.allocate(&mut a, 0, 10, &mut Vec::new()));
        kv.commit(&mut a, &prompt, 10);

        // Same first 8 tokens, different tail: two full blocks are shared.
        let mut other = prompt[..8].to_vec();
        other.extend([999, 998, 997]);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &other), 8);
        assert_eq!(&b.table()[..2], &a.table()[..2]);
        assert_eq!(kv.prefix_cache_stats(), PrefixCacheStats { queries: 21, hits: 8 });

        // A prompt that is exactly two cached blocks still leaves one token to compute.
        let mut c = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut c, &prompt[..8]), 4);
        kv.free(&mut a);
        kv.free(&mut b);
        kv.free(&mut c);
        assert_eq!(kv.num_free_blocks(), 16);
        kv.check_invariants();
    }

    #[test]
    fn freed_prefix_survives_until_evicted() {
        let mut kv = KvCacheManager::new(3, 4, true);
        let prompt = tokens(9, 1);
        let mut a = SeqBlocks::default();
        assert!(kv.allocate(&mut a, 0, 9, &mut Vec::new()));
        kv.commit(&mut a, &prompt, 9);
        kv.free(&mut a);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &prompt), 8, "cached blocks outlive their sequence");
        kv.free(&mut b);
        // Filling the pool with other work evicts them.
        let mut filler = SeqBlocks::default();
        assert!(kv.allocate(&mut filler, 0, 12, &mut Vec::new()));
        kv.free(&mut filler);
        let mut c = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut c, &prompt), 0);
        kv.check_invariants();
    }

    #[test]
    fn forked_sequences_copy_the_shared_partial_block_on_write() {
        let mut kv = KvCacheManager::new(8, 4, false);
        let mut parent = SeqBlocks::default();
        assert!(kv.allocate(&mut parent, 0, 6, &mut Vec::new())); // blocks: full, partial (2 of 4)
        let mut child = kv.fork(&parent);
        assert_eq!(kv.num_free_blocks(), 6);

        // The child appends at position 6, inside the shared partial block: it gets a copy.
        let mut copies = Vec::new();
        assert!(kv.allocate(&mut child, 6, 7, &mut copies));
        assert_eq!(copies, vec![(parent.table()[1], child.table()[1])]);
        assert_eq!(child.table()[0], parent.table()[0], "full blocks stay shared");
        assert_ne!(child.table()[1], parent.table()[1]);

        // The parent is now the only holder of its block: it writes in place.
        copies.clear();
        assert!(kv.allocate(&mut parent, 6, 7, &mut copies));
        assert!(copies.is_empty());
        kv.free(&mut parent);
        kv.free(&mut child);
        assert_eq!(kv.num_free_blocks(), 8);
        kv.check_invariants();
    }

    #[test]
    fn blocks_wholly_before_a_sliding_window_are_given_back_once() {
        let mut kv = KvCacheManager::new(16, 4, true).with_sliding_window(Some(6));
        let tokens = tokens(30, 3);
        let mut seq = SeqBlocks::default();
        assert!(kv.allocate(&mut seq, 0, 10, &mut Vec::new()));
        kv.commit(&mut seq, &tokens, 10);
        // The query at position 10 sees 5..=10: block 0 (0..4) is out, block 1 (4..8) is not.
        assert_eq!((seq.released(), seq.num_held(), kv.num_free_blocks()), (1, 2, 14));
        let mut child = kv.fork(&seq);
        for end in 11..=29 {
            assert!(kv.allocate(&mut seq, end - 1, end, &mut Vec::new()));
            kv.commit(&mut seq, &tokens, end);
            kv.check_invariants();
        }
        // Position 29 sees 24..=29: blocks 0..6 are out; the table keeps its 8 entries.
        assert_eq!((seq.num_blocks(), seq.released(), seq.num_held()), (8, 6, 2));
        kv.free(&mut seq);
        kv.free(&mut child);
        assert_eq!(kv.num_free_blocks(), 16);
        kv.check_invariants();
        // The released full blocks are still in the prefix cache for a later request.
        let mut again = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut again, &tokens[..12]), 8);
        kv.free(&mut again);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut kv = KvCacheManager::new(2, 4, false);
        let mut a = SeqBlocks::default();
        assert!(!kv.allocate(&mut a, 0, 9, &mut Vec::new()));
        assert_eq!(a.num_blocks(), 0);
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(kv.allocate(&mut a, 0, 8, &mut Vec::new()));
        assert_eq!(kv.usage(), 1.0);
    }
}
