//! The pool of physical KV blocks: reference counts, the free list in eviction order, and the
//! prefix-cache map from a full block's chained token hash to the block that holds it.
//!
//! A free block (reference count 0) may still hold a cached prefix: it stays findable by its hash
//! until the allocator takes it, which evicts it. The free list is ordered least recently freed
//! first, so allocation evicts the least recently used cached blocks first (vLLM's policy).
//!
//! Invariants (checked by `check_invariants`, called in debug builds after every change):
//! - a block is in the free list if and only if its reference count is 0;
//! - every entry of the hash map points at a block whose `hash` is that key, and a block with a
//!   hash is in the map.

use std::collections::HashMap;

pub type BlockId = u32;

/// Chained hash of a full block: it covers the block's tokens and every token before them.
pub type BlockHash = u64;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_count: u32,
    hash: Option<BlockHash>,
    /// Links of the free list (`NIL` when absent or at an end).
    prev: u32,
    next: u32,
    in_free_list: bool,
}

/// A block no sequence holds and no prefix is cached in (`BlockPool::states`).
pub const BLOCK_FREE: u8 = 0;
/// A block held by at least one sequence.
pub const BLOCK_USED: u8 = 1;
/// A free block that still holds a cached prefix.
pub const BLOCK_CACHED: u8 = 2;

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "too many blocks");
        let mut pool = BlockPool {
            blocks: vec![BlockMeta { ref_count: 0, hash: None, prev: NIL, next: NIL, in_free_list: false }; num_blocks],
            free_head: NIL,
            free_tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
        };
        for b in 0..num_blocks as BlockId {
            pool.push_free_tail(b);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be allocated now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Every block's state, in block order: `BLOCK_FREE`, `BLOCK_USED` (held by a sequence) or
    /// `BLOCK_CACHED` (free, but its tokens are kept for prefix caching until reused).
    pub fn states(&self) -> Vec<u8> {
        self.blocks
            .iter()
            .map(|b| match (b.ref_count, b.hash) {
                (0, None) => BLOCK_FREE,
                (0, Some(_)) => BLOCK_CACHED,
                _ => BLOCK_USED,
            })
            .collect()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block as usize].ref_count
    }

    /// Takes `n` blocks from the head of the free list (evicting any cached prefix they hold),
    /// each with reference count 1; or none at all if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.free_head;
            self.unlink_free(b);
            let meta = &mut self.blocks[b as usize];
            if let Some(hash) = meta.hash.take() {
                self.cached.remove(&hash);
            }
            meta.ref_count = 1;
            out.push(b);
        }
        self.debug_check();
        Some(out)
    }

    /// Drops one reference to each block. Blocks that reach zero join the tail of the free list
    /// in the order given: pass a sequence's blocks last-first so its tail is evicted first.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let meta = &mut self.blocks[b as usize];
            assert!(meta.ref_count > 0, "block {b} released more often than it was held");
            meta.ref_count -= 1;
            if meta.ref_count == 0 {
                self.push_free_tail(b);
            }
        }
        self.debug_check();
    }

    /// Adds one reference to a held block (a forked sequence sharing it).
    pub fn retain(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block as usize];
        assert!(meta.ref_count > 0, "retain of free block {block}");
        meta.ref_count += 1;
    }

    /// The block caching `hash`, if any, now held once more (taken off the free list if free).
    pub fn take_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        let &b = self.cached.get(&hash)?;
        if self.blocks[b as usize].in_free_list {
            self.unlink_free(b);
        }
        self.blocks[b as usize].ref_count += 1;
        self.debug_check();
        Some(b)
    }

    /// Whether a block with this hash is cached (held or free).
    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Records that held block `block` is full and holds the prefix `hash`. If another block
    /// already caches that prefix, this one stays unhashed (both hold the same data).
    pub fn register(&mut self, block: BlockId, hash: BlockHash) {
        debug_assert!(self.blocks[block as usize].ref_count > 0);
        if self.blocks[block as usize].hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.blocks[block as usize].hash = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Forgets every cached prefix (blocks stay where they are).
    pub fn reset_prefix_cache(&mut self) {
        for (_, b) in self.cached.drain() {
            self.blocks[b as usize].hash = None;
        }
    }

    fn push_free_tail(&mut self, b: BlockId) {
        let meta = &mut self.blocks[b as usize];
        debug_assert!(!meta.in_free_list);
        meta.in_free_list = true;
        meta.prev = self.free_tail;
        meta.next = NIL;
        if self.free_tail == NIL {
            self.free_head = b;
        } else {
            self.blocks[self.free_tail as usize].next = b;
        }
        self.free_tail = b;
        self.num_free += 1;
    }

    fn unlink_free(&mut self, b: BlockId) {
        let (prev, next) = {
            let meta = &mut self.blocks[b as usize];
            debug_assert!(meta.in_free_list);
            meta.in_free_list = false;
            (std::mem::replace(&mut meta.prev, NIL), std::mem::replace(&mut meta.next, NIL))
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Panics if an invariant of the module header is broken.
    pub fn check_invariants(&self) {
        let mut walked = 0;
        let mut b = self.free_head;
        let mut prev = NIL;
        while b != NIL {
            let meta = &self.blocks[b as usize];
            assert!(meta.in_free_list && meta.ref_count == 0, "block {b} in the free list with references");
            assert_eq!(meta.prev, prev, "broken free-list link at block {b}");
            walked += 1;
            assert!(walked <= self.blocks.len(), "free list has a cycle");
            prev = b;
            b = meta.next;
        }
        assert_eq!(walked, self.num_free, "free count drifted");
        for (i, meta) in self.blocks.iter().enumerate() {
            assert_eq!(meta.in_free_list, meta.ref_count == 0, "block {i}: free-list membership vs ref count");
            if let Some(h) = meta.hash {
                assert_eq!(self.cached.get(&h), Some(&(i as BlockId)), "block {i}: hash not in the map");
            }
        }
        for (h, &b) in &self.cached {
            assert_eq!(self.blocks[b as usize].hash, Some(*h), "map entry for a block without that hash");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_all_or_nothing_and_frees() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        pool.release(a.iter().rev().copied());
        assert_eq!(pool.num_free(), 4);
        pool.check_invariants();
    }

    #[test]
    fn cached_free_blocks_are_found_until_evicted_in_lru_order() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate(2).unwrap();
        pool.register(a[0], 100);
        pool.register(a[1], 200);
        pool.release(a.iter().rev().copied()); // free list: 2, a1, a0
        assert_eq!(pool.num_free(), 3);
        // A hit takes the block back off the free list.
        assert_eq!(pool.take_cached(100), Some(a[0]));
        assert_eq!(pool.num_free(), 2);
        // Allocating two evicts the unhashed block first, then a[1] (freed before a[0] came back).
        let b = pool.allocate(2).unwrap();
        assert_eq!(b, vec![2, a[1]]);
        assert!(!pool.is_cached(200), "evicted");
        assert!(pool.is_cached(100));
        pool.check_invariants();
    }

    #[test]
    fn states_tell_free_used_and_cached_blocks_apart() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        pool.register(a[0], 7);
        assert_eq!(pool.states(), vec![BLOCK_USED, BLOCK_USED, BLOCK_USED, BLOCK_FREE]);
        pool.release([a[0], a[1]]);
        let mut states = pool.states();
        assert_eq!(states.iter().filter(|&&s| s == BLOCK_CACHED).count(), 1, "{states:?}");
        assert_eq!(states[a[0] as usize], BLOCK_CACHED);
        assert_eq!(states[a[1] as usize], BLOCK_FREE);
        states.sort();
        assert_eq!(states, vec![BLOCK_FREE, BLOCK_FREE, BLOCK_USED, BLOCK_CACHED]);
    }

    #[test]
    fn shared_blocks_need_every_reference_released() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap();
        pool.retain(a[0]);
        pool.release([a[0]]);
        assert_eq!(pool.num_free(), 1);
        pool.release([a[0]]);
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    #[should_panic(expected = "released more often")]
    fn double_release_is_caught() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap();
        pool.release(a.clone());
        pool.release(a);
    }
}
