//! The CPU backend's KV cache memory: one key and one value array per layer, in the layout of
//! `kv_cache::KvCacheLayout`, as float32 or as E4M3 bytes (`KvCacheDtype`). Which blocks belong to
//! whom is not known here: that is the block pool's business; this only stores what the forward
//! writes through the slot mapping, and hands the attention its rows (`KvRows`).
//!
//! The FP8 cache is the reference of the GPU's: a value is stored as `e4m3(x / scale)` and read
//! back as `byte · scale`, exactly the GPU kernels' format.

use crate::kv_cache::{KvCacheDtype, KvCacheLayout, KV_FP8_SCALE};
use crate::model::fp8::{e4m3_bits, e4m3_value};

/// One layer's key and value arrays of element type `T`.
struct Arrays<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: Copy + Default> Arrays<T> {
    fn new(layout: &KvCacheLayout) -> Self {
        let layer = || vec![T::default(); layout.layer_len()];
        Arrays { keys: (0..layout.num_layers).map(|_| layer()).collect(), values: (0..layout.num_layers).map(|_| layer()).collect() }
    }

    /// Stores one token's rows (all KV heads back to back), each value through `convert`.
    fn write(&mut self, layout: &KvCacheLayout, layer: usize, slot: usize, keys: &[f32], values: &[f32], convert: impl Fn(f32) -> T) {
        let hd = layout.head_dim;
        for kv_head in 0..layout.num_kv_heads {
            let at = layout.offset(slot, kv_head);
            let (src_k, src_v) = (&keys[kv_head * hd..(kv_head + 1) * hd], &values[kv_head * hd..(kv_head + 1) * hd]);
            for (dst, &x) in self.keys[layer][at..at + hd].iter_mut().zip(src_k) {
                *dst = convert(x);
            }
            for (dst, &x) in self.values[layer][at..at + hd].iter_mut().zip(src_v) {
                *dst = convert(x);
            }
        }
    }

    fn copy_block(&mut self, layout: &KvCacheLayout, src: usize, dst: usize) {
        let len = layout.num_kv_heads * layout.block_size * layout.head_dim;
        for array in self.keys.iter_mut().chain(self.values.iter_mut()) {
            array.copy_within(src * len..(src + 1) * len, dst * len);
        }
    }
}

enum Storage {
    F32(Arrays<f32>),
    Fp8(Arrays<u8>),
}

pub struct CpuKvCache {
    layout: KvCacheLayout,
    storage: Storage,
}

/// One layer's keys or values as the attention reads them.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    /// E4M3 bytes and the scale they are read back with.
    Fp8 { bytes: &'a [u8], scale: f32 },
}

impl KvRows<'_> {
    /// Every value, decoded.
    pub fn to_vec(&self) -> Vec<f32> {
        match *self {
            KvRows::F32(values) => values.to_vec(),
            KvRows::Fp8 { bytes, scale } => bytes.iter().map(|&b| e4m3_value(b) * scale).collect(),
        }
    }

    /// The `buf.len()` values from element `at`: borrowed when they are stored as float32, else
    /// decoded into `buf`.
    #[inline]
    pub fn row<'s>(&'s self, at: usize, buf: &'s mut [f32]) -> &'s [f32] {
        match *self {
            KvRows::F32(values) => &values[at..at + buf.len()],
            KvRows::Fp8 { bytes, scale } => {
                let len = buf.len();
                for (out, &b) in buf.iter_mut().zip(&bytes[at..at + len]) {
                    *out = e4m3_value(b) * scale;
                }
                buf
            }
        }
    }
}

impl CpuKvCache {
    /// Bytes of cache memory for `layout` with values of `dtype` (`Auto`: float32).
    pub fn bytes_for(layout: &KvCacheLayout, dtype: KvCacheDtype) -> usize {
        layout.block_bytes(dtype.bytes_per_value(std::mem::size_of::<f32>())) * layout.num_blocks
    }

    /// A float32 cache.
    pub fn new(layout: KvCacheLayout) -> Self {
        Self::with_dtype(layout, KvCacheDtype::Auto)
    }

    pub fn with_dtype(layout: KvCacheLayout, dtype: KvCacheDtype) -> Self {
        let storage = match dtype {
            KvCacheDtype::Auto => Storage::F32(Arrays::new(&layout)),
            KvCacheDtype::Fp8E4M3 => Storage::Fp8(Arrays::new(&layout)),
        };
        CpuKvCache { layout, storage }
    }

    pub fn layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    pub fn dtype(&self) -> KvCacheDtype {
        match self.storage {
            Storage::F32(_) => KvCacheDtype::Auto,
            Storage::Fp8(_) => KvCacheDtype::Fp8E4M3,
        }
    }

    /// Stores one token's keys and values (all KV heads, back to back) at `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, keys: &[f32], values: &[f32]) {
        let layout = self.layout;
        match &mut self.storage {
            Storage::F32(arrays) => arrays.write(&layout, layer, slot, keys, values, |x| x),
            Storage::Fp8(arrays) => arrays.write(&layout, layer, slot, keys, values, |x| e4m3_bits(x / KV_FP8_SCALE)),
        }
    }

    /// Copies block `src` over block `dst` in every layer (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let layout = self.layout;
        match &mut self.storage {
            Storage::F32(arrays) => arrays.copy_block(&layout, src, dst),
            Storage::Fp8(arrays) => arrays.copy_block(&layout, src, dst),
        }
    }

    /// The keys and the values of `layer`.
    pub fn layer(&self, layer: usize) -> (KvRows<'_>, KvRows<'_>) {
        match &self.storage {
            Storage::F32(a) => (KvRows::F32(&a.keys[layer]), KvRows::F32(&a.values[layer])),
            Storage::Fp8(a) => (
                KvRows::Fp8 { bytes: &a.keys[layer], scale: KV_FP8_SCALE },
                KvRows::Fp8 { bytes: &a.values[layer], scale: KV_FP8_SCALE },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fp8_cache_stores_e4m3_and_reads_back_what_it_stored() {
        let layout = KvCacheLayout { num_layers: 2, num_blocks: 3, block_size: 4, num_kv_heads: 2, head_dim: 4 };
        let keys: Vec<f32> = (0..8).map(|i| i as f32 * 0.37 - 1.3).collect();
        let values: Vec<f32> = (0..8).map(|i| 600.0 - i as f32 * 150.0).collect(); // 600 saturates
        let mut exact = CpuKvCache::new(layout);
        let mut fp8 = CpuKvCache::with_dtype(layout, KvCacheDtype::Fp8E4M3);
        assert_eq!(CpuKvCache::bytes_for(&layout, KvCacheDtype::Fp8E4M3) * 4, CpuKvCache::bytes_for(&layout, KvCacheDtype::Auto));
        for cache in [&mut exact, &mut fp8] {
            cache.write(1, 6, &keys, &values);
            cache.copy_block(1, 2); // slot 6 is block 1, offset 2: now also slot 10
        }
        let mut buf = [0.0f32; 4];
        for slot in [6, 10] {
            for kv_head in 0..2 {
                let at = layout.offset(slot, kv_head);
                let (k_exact, v_exact) = exact.layer(1);
                let (k_fp8, v_fp8) = fp8.layer(1);
                assert_eq!(k_exact.row(at, &mut buf), &keys[kv_head * 4..][..4]);
                let k = k_fp8.row(at, &mut buf).to_vec();
                for (d, (&got, &want)) in k.iter().zip(&keys[kv_head * 4..][..4]).enumerate() {
                    assert_eq!(got, e4m3_value(e4m3_bits(want)), "slot {slot} head {kv_head} dim {d}");
                    assert!((got - want).abs() <= want.abs() / 16.0 + 1e-3);
                }
                let v = v_fp8.row(at, &mut buf).to_vec();
                let want: Vec<f32> = values[kv_head * 4..][..4].iter().map(|&x| x.clamp(-448.0, 448.0)).collect();
                for (&got, &want) in v.iter().zip(&want) {
                    assert!((got - want).abs() <= want.abs() / 16.0, "{got} for {want}");
                }
                assert_eq!(v_exact.row(at, &mut buf), &values[kv_head * 4..][..4]);
            }
        }
        // Layer 0 was never written: zeros in both.
        assert!(fp8.layer(0).0.row(layout.offset(6, 0), &mut buf).iter().all(|&x| x == 0.0));
        assert_eq!(fp8.dtype(), KvCacheDtype::Fp8E4M3);
    }
}
