//! Deterministic random weights for any shape (`--load-format dummy`), for benchmarks on sizes
//! we cannot download. Each tensor's values depend only on its name and the seed, so two runs see
//! the same model; they are made in parallel, in chunks of their own seeds.

use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use crate::model::{ModelConfig, ModelError, Tensor, WeightSource};

pub struct DummySource {
    seed: u64,
    /// Standard deviation of the matrices.
    scale: f32,
    /// Every norm weight: norms are the identity, as in freshly initialised models.
    norm_weight: f32,
}

impl DummySource {
    pub fn new(seed: u64) -> Self {
        DummySource { seed, scale: 0.02, norm_weight: 1.0 }
    }

    /// For `config`'s model: its norms stored as zeros where they compute `(1 + w)` (Gemma), so
    /// that they too are the identity.
    pub fn for_model(seed: u64, config: &ModelConfig) -> Self {
        DummySource { norm_weight: if config.norm_unit_offset { 0.0 } else { 1.0 }, ..Self::new(seed) }
    }

    fn tensor_seed(&self, name: &str) -> u64 {
        // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed;
        for byte in name.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }
}

/// Random GGUF Q4_K blocks for a `[rows, cols]` matrix (`cols` a multiple of 256), for
/// benchmarks of weights kept quantized: sub-block scales of 32 to 63 and mins that centre each
/// sub-block, so the weights are spread like the float dummies (standard deviation about 0.02,
/// mean about 0). Deterministic in `seed`; made in parallel, a row of blocks per seed.
pub fn dummy_q4k_blocks(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    const BLOCK: usize = 144;
    let per_row = cols / 256;
    // d · sc · 4.6 (the spread of q uniform in 0..16) at sc ≈ 48 is 0.02.
    let d = half::f16::from_f32(0.02 / (4.6 * 48.0));
    let dmin = half::f16::from_f32(d.to_f32() * 8.0);
    let mut out = vec![0u8; rows * per_row * BLOCK];
    out.par_chunks_mut(per_row * BLOCK).enumerate().for_each(|(row, bytes)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for block in bytes.chunks_exact_mut(BLOCK) {
            block[0..2].copy_from_slice(&d.to_le_bytes());
            block[2..4].copy_from_slice(&dmin.to_le_bytes());
            let sc: [u8; 8] = std::array::from_fn(|_| rng.random_range(32..64));
            // The min that puts the sub-block's mean (q = 7.5) at zero: dmin · m = d · sc · 7.5.
            let m: [u8; 8] = std::array::from_fn(|i| ((f32::from(sc[i]) * 7.5 / 8.0).round() as u8).min(63));
            // ggml's 12-byte packing (the inverse of get_scale_min_k4).
            for i in 0..4 {
                block[4 + i] = (sc[i] & 63) | ((sc[i + 4] >> 4) << 6);
                block[4 + i + 4] = (m[i] & 63) | ((m[i + 4] >> 4) << 6);
                block[4 + i + 8] = (sc[i + 4] & 0x0F) | ((m[i + 4] & 0x0F) << 4);
            }
            rng.fill(&mut block[16..]);
        }
    });
    out
}

impl WeightSource for DummySource {
    fn load(&self, hf_name: &str, expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let n: usize = expected_shape.iter().product();
        const CHUNK: usize = 1 << 16;
        let data = if hf_name.ends_with("norm.weight") {
            vec![self.norm_weight; n]
        } else {
            let seed = self.tensor_seed(hf_name);
            // Uniform with the same standard deviation as N(0, scale): cheaper and bounded.
            let half_width = self.scale * 3f32.sqrt();
            let mut data = vec![0.0f32; n];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                chunk.iter_mut().for_each(|v| *v = rng.random_range(-half_width..half_width));
            });
            data
        };
        Tensor::new(expected_shape.to_vec(), data).map(Some)
    }

    fn is_dummy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_q4k_blocks_dequantize_to_centred_weights_of_the_dummy_spread() {
        let (rows, cols) = (64, 512);
        let blocks = dummy_q4k_blocks(rows, cols, 7);
        assert_eq!(blocks.len(), rows * cols / 256 * 144);
        assert_eq!(blocks, dummy_q4k_blocks(rows, cols, 7), "deterministic");
        let mut w = vec![0.0f32; rows * cols];
        crate::model::gguf::dequantize(crate::model::gguf::GgmlType::Q4_K, &blocks, rows * cols, &mut w).unwrap();
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
        assert!(w.iter().all(|v| v.is_finite()));
        assert!(mean.abs() < 2e-3 && (0.012..0.03).contains(&std), "mean {mean} std {std}");
    }

    #[test]
    fn same_name_same_values_and_norms_are_ones() {
        let source = DummySource::new(7);
        let a = source.load("model.layers.0.self_attn.q_proj.weight", &[4, 8]).unwrap().unwrap();
        let b = source.load("model.layers.0.self_attn.q_proj.weight", &[4, 8]).unwrap().unwrap();
        let c = source.load("model.layers.1.self_attn.q_proj.weight", &[4, 8]).unwrap().unwrap();
        assert_eq!(a, b);
        assert_ne!(a.data, c.data);
        assert!(a.data.iter().all(|v| v.abs() < 0.035));
        let norm = source.load("model.norm.weight", &[8]).unwrap().unwrap();
        assert!(norm.data.iter().all(|&v| v == 1.0));
    }
}
