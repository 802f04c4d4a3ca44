//! The CPU backend's KV cache memory: one key and one value array per layer, in the layout of
//! `kv_cache::KvCacheLayout`. Which blocks belong to whom is not known here: that is the block
//! pool's business; this only stores what the forward writes through the slot mapping.

use crate::kv_cache::KvCacheLayout;

pub struct CpuKvCache {
    layout: KvCacheLayout,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl CpuKvCache {
    /// Bytes of cache memory for `layout` (float32 keys and values).
    pub fn bytes_for(layout: &KvCacheLayout) -> usize {
        layout.block_bytes(4) * layout.num_blocks
    }

    pub fn new(layout: KvCacheLayout) -> Self {
        let layer = || vec![0.0f32; layout.layer_len()];
        CpuKvCache {
            layout,
            keys: (0..layout.num_layers).map(|_| layer()).collect(),
            values: (0..layout.num_layers).map(|_| layer()).collect(),
        }
    }

    pub fn layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    /// Stores one token's keys and values (all KV heads, back to back) at `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, keys: &[f32], values: &[f32]) {
        let hd = self.layout.head_dim;
        for kv_head in 0..self.layout.num_kv_heads {
            let at = self.layout.offset(slot, kv_head);
            self.keys[layer][at..at + hd].copy_from_slice(&keys[kv_head * hd..(kv_head + 1) * hd]);
            self.values[layer][at..at + hd].copy_from_slice(&values[kv_head * hd..(kv_head + 1) * hd]);
        }
    }

    /// Copies block `src` over block `dst` in every layer (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let len = self.layout.num_kv_heads * self.layout.block_size * self.layout.head_dim;
        for array in self.keys.iter_mut().chain(self.values.iter_mut()) {
            array.copy_within(src * len..(src + 1) * len, dst * len);
        }
    }

    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}
