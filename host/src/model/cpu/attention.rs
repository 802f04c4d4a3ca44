//! Paged attention on the CPU: each query token attends, causally, to every earlier position of
//! its own sequence, reading keys and values from the cache through the sequence's block table.
//! The same code serves prefill chunks, decode tokens and prefix-cache hits, because what was
//! computed before is simply in the cache.
//!
//! Grouped-query attention: the query heads of one group share a KV head, so each key and value
//! row is read once per group. A sliding window limits a query to the last `window` positions
//! (itself included); blocks before it are never read, so the KV manager may have given them back.

use rayon::prelude::*;

use super::kv_storage::KvRows;
use super::ops::{axpy, dot};
use crate::kv_cache::KvCacheLayout;
use crate::model::config::LayerAttention;
use crate::runner::ForwardBatch;

/// The query side of one layer's attention.
pub struct AttentionShape {
    pub num_heads: usize,
    /// Floats from one token's queries to the next (the queries lead each row of `q`).
    pub q_stride: usize,
    /// Window, scale and soft-cap.
    pub layer: LayerAttention,
}

/// `out[t, head]` = softmax(cap(q·Kᵀ · scale)) · V for every token `t` of `batch`, over the
/// positions its window sees. `q` rows are `shape.q_stride` apart; `out` is
/// `[num_tokens, num_heads * head_dim]`.
pub fn paged_attention(
    out: &mut [f32],
    q: &[f32],
    batch: &ForwardBatch,
    keys: KvRows<'_>,
    values: KvRows<'_>,
    layout: &KvCacheLayout,
    shape: &AttentionShape,
) {
    let hd = layout.head_dim;
    let num_heads = shape.num_heads;
    let group = num_heads / layout.num_kv_heads;
    let row = num_heads * hd;
    let LayerAttention { window, scale, softcap, .. } = shape.layer;
    out.par_chunks_mut(row).enumerate().for_each(|(t, out_row)| {
        let seq = &batch.seqs[batch.token_seq[t] as usize];
        let end = batch.positions[t] as usize + 1;
        let start = window.map_or(0, |w| end.saturating_sub(w));
        let context = end - start;
        let q_row = &q[t * shape.q_stride..][..row];
        // Slots of the positions seen, resolved once for all heads.
        let slots: Vec<usize> = (start..end)
            .map(|p| seq.block_table[p / layout.block_size] as usize * layout.block_size + p % layout.block_size)
            .collect();
        let mut scores = vec![0.0f32; group * context];
        // A key or value row decoded from an FP8 cache (unused for float32 caches, read in place).
        let mut row_buf = vec![0.0f32; hd];
        for kv_head in 0..layout.num_kv_heads {
            let heads = kv_head * group..(kv_head + 1) * group;
            for (p, &slot) in slots.iter().enumerate() {
                let key = keys.row(layout.offset(slot, kv_head), &mut row_buf);
                for (g, head) in heads.clone().enumerate() {
                    let score = dot(&q_row[head * hd..(head + 1) * hd], key) * scale;
                    scores[g * context + p] = match softcap {
                        Some(cap) => cap * (score / cap).tanh(),
                        None => score,
                    };
                }
            }
            for g in 0..group {
                softmax_in_place(&mut scores[g * context..(g + 1) * context]);
            }
            for head in heads.clone() {
                out_row[head * hd..(head + 1) * hd].fill(0.0);
            }
            for (p, &slot) in slots.iter().enumerate() {
                let value = values.row(layout.offset(slot, kv_head), &mut row_buf);
                for (g, head) in heads.clone().enumerate() {
                    axpy(&mut out_row[head * hd..(head + 1) * hd], scores[g * context + p], value);
                }
            }
        }
    });
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::CpuKvCache;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Attention over plain contiguous `[len, kv_heads, hd]` arrays, written independently:
    /// position `p` is seen from `t` when `t - window < p <= t`; scores are `cap * tanh(s / cap)`.
    #[allow(clippy::too_many_arguments)]
    fn contiguous_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        len: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        window: Option<usize>,
        cap: Option<f64>,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0.0; len * heads * hd];
        for t in 0..len {
            let seen: Vec<usize> = (0..=t).filter(|&p| window.is_none_or(|w| t < p + w)).collect();
            for h in 0..heads {
                let kvh = h / group;
                let qv = &q[(t * heads + h) * hd..][..hd];
                let s: Vec<f64> = seen
                    .iter()
                    .map(|&p| {
                        let kv = &k[(p * kv_heads + kvh) * hd..][..hd];
                        let score = qv.iter().zip(kv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (hd as f64).sqrt();
                        cap.map_or(score, |c| c * (score / c).tanh())
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = seen.iter().zip(&e).map(|(&p, e)| e / total * v[(p * kv_heads + kvh) * hd + d] as f64).sum();
                    out[(t * heads + h) * hd + d] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn scattered_blocks_equal_contiguous_attention_with_and_without_window_and_softcap() {
        let (heads, kv_heads, hd, block_size) = (6, 2, 16, 4);
        let len = 23; // not a multiple of the block size
        let layout = KvCacheLayout { num_layers: 1, num_blocks: 12, block_size, num_kv_heads: kv_heads, head_dim: hd };
        let mut rng = StdRng::seed_from_u64(3);
        // Large enough values that a soft-cap of 2 changes the scores.
        let mut rand_vec = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (q, k, v) = (rand_vec(len * heads * hd), rand_vec(len * kv_heads * hd), rand_vec(len * kv_heads * hd));

        // Six blocks scattered through the pool, out of order.
        let table = [9, 2, 11, 0, 5, 7];
        let mut batch = ForwardBatch::new(block_size, layout.num_blocks);
        batch.push_seq(&vec![0; len], 0, &table, true).unwrap();
        let mut cache = CpuKvCache::new(layout);
        for t in 0..len {
            let row = kv_heads * hd;
            cache.write(0, batch.slot_mapping[t] as usize, &k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row]);
        }
        let (keys, values) = cache.layer(0);
        let mut outputs = Vec::new();
        for (window, cap) in [(None, None), (Some(5), None), (None, Some(2.0f32)), (Some(8), Some(2.0))] {
            let mut paged = vec![0.0; len * heads * hd];
            let layer = LayerAttention { window, softcap: cap, ..LayerAttention::full(hd) };
            let shape = AttentionShape { num_heads: heads, q_stride: heads * hd, layer };
            paged_attention(&mut paged, &q, &batch, keys, values, &layout, &shape);
            let reference = contiguous_attention(&q, &k, &v, len, heads, kv_heads, hd, window, cap.map(f64::from));
            let max_ref = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let max_err = paged.iter().zip(&reference).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(max_err / max_ref < 1e-5, "window {window:?} cap {cap:?}: relative error {}", max_err / max_ref);
            outputs.push(paged);
        }
        assert!(outputs[1..].iter().all(|o| o != &outputs[0]), "the window and the cap each change the output");
    }

    #[test]
    fn an_fp8_cache_is_attention_over_its_e4m3_values() {
        let (heads, kv_heads, hd, block_size) = (4, 2, 8, 4);
        let len = 13;
        let layout = KvCacheLayout { num_layers: 1, num_blocks: 8, block_size, num_kv_heads: kv_heads, head_dim: hd };
        let mut rng = StdRng::seed_from_u64(5);
        let mut rand_vec = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-3.0..3.0)).collect() };
        let (q, k, v) = (rand_vec(len * heads * hd), rand_vec(len * kv_heads * hd), rand_vec(len * kv_heads * hd));
        let table = [3, 6, 1, 4];
        let mut batch = ForwardBatch::new(block_size, layout.num_blocks);
        batch.push_seq(&vec![0; len], 0, &table, true).unwrap();
        let mut cache = CpuKvCache::with_dtype(layout, crate::kv_cache::KvCacheDtype::Fp8E4M3);
        let row = kv_heads * hd;
        for t in 0..len {
            cache.write(0, batch.slot_mapping[t] as usize, &k[t * row..(t + 1) * row], &v[t * row..(t + 1) * row]);
        }
        let (keys, values) = cache.layer(0);
        let mut paged = vec![0.0; len * heads * hd];
        let shape = AttentionShape { num_heads: heads, q_stride: heads * hd, layer: LayerAttention::full(hd) };
        paged_attention(&mut paged, &q, &batch, keys, values, &layout, &shape);
        // The reference over the values the cache holds (E4M3 at scale 1) is what it computes ...
        let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| crate::model::fp8::e4m3_value(crate::model::fp8::e4m3_bits(x))).collect() };
        let reference = contiguous_attention(&q, &round(&k), &round(&v), len, heads, kv_heads, hd, None, None);
        let max_err = paged.iter().zip(&reference).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_err < 1e-5, "against the rounded values: {max_err}");
        // ... and over the exact values it is off by the rounding, which is not nothing.
        let exact = contiguous_attention(&q, &k, &v, len, heads, kv_heads, hd, None, None);
        let off = paged.iter().zip(&exact).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(off > 1e-3 && off < 0.5, "against the exact values: {off}");
    }
}
