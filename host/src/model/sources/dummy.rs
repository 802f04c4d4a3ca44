//! Deterministic random weights for any shape (`--load-format dummy`), for benchmarks on sizes
//! we cannot download. Each tensor's values depend only on its name and the seed, so two runs see
//! the same model; they are made in parallel, in chunks of their own seeds.

use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use crate::model::gguf::GgmlType;
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

/// Random GGUF blocks of `ty` for a `[rows, cols]` matrix (`cols` a multiple of the type's block),
/// for benchmarks and checks of weights kept quantized (`ty` one of the kept types: Q4_0, Q4_1,
/// Q8_0, Q4_K, Q5_K, Q6_K). The quants are uniform random; the scales spread the weights like the
/// float dummies (standard deviation about 0.02), and where the type has mins (Q4_1, K-quants) they
/// centre each (sub-)block near 0. Deterministic in `seed`; made in parallel, a row of blocks per
/// seed.
pub fn dummy_ggml_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Result<Vec<u8>, ModelError> {
    let (values, size) = (ty.block_size(), ty.type_size());
    if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
        return Err(ModelError::Format(format!("no dummy {ty:?} blocks: the dummy quantized types are Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K")));
    }
    if cols == 0 || !cols.is_multiple_of(values) {
        return Err(ModelError::Shape(format!("{cols} columns are not whole {ty:?} blocks of {values}")));
    }
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    // The standard deviation of a uniform quant of `levels` values is about levels / sqrt(12).
    let spread = |levels: f32| levels / 12f32.sqrt();
    let per_row = cols / values;
    let mut out = vec![0u8; rows * per_row * size];
    out.par_chunks_mut(per_row * size).enumerate().for_each(|(row, bytes)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for block in bytes.chunks_exact_mut(size) {
            rng.fill(&mut block[..]);
            match ty {
                GgmlType::Q4_0 => block[0..2].copy_from_slice(&f16(0.02 / spread(16.0))),
                GgmlType::Q4_1 => {
                    let d = 0.02 / spread(16.0);
                    block[0..2].copy_from_slice(&f16(d));
                    block[2..4].copy_from_slice(&f16(-7.5 * d));
                }
                GgmlType::Q8_0 => block[0..2].copy_from_slice(&f16(0.02 / spread(256.0))),
                GgmlType::Q6_K => {
                    // Sub-block scales of 32 to 63 (int8), d · scale · 18.5 at scale ≈ 48 is 0.02.
                    for sc in &mut block[192..208] {
                        *sc = rng.random_range(32..64);
                    }
                    block[208..210].copy_from_slice(&f16(0.02 / (spread(64.0) * 48.0)));
                }
                _ => {
                    // Q4_K, Q5_K: sub-block scales of 32 to 63; the min that puts the sub-block's mean
                    // (q = levels / 2 - 0.5) at zero: dmin · m = d · sc · mean, with dmin = d · mean so
                    // that m is about sc, within 6 bits.
                    let levels = if ty == GgmlType::Q5_K { 32.0 } else { 16.0 };
                    let mean = levels / 2.0 - 0.5;
                    let d = half::f16::from_f32(0.02 / (spread(levels) * 48.0));
                    let dmin = half::f16::from_f32(d.to_f32() * mean);
                    block[0..2].copy_from_slice(&d.to_le_bytes());
                    block[2..4].copy_from_slice(&dmin.to_le_bytes());
                    let sc: [u8; 8] = std::array::from_fn(|_| rng.random_range(32..64));
                    let m: [u8; 8] = std::array::from_fn(|i| ((f32::from(sc[i]) * d.to_f32() * mean / dmin.to_f32()).round() as u8).min(63));
                    // ggml's 12-byte packing (the inverse of get_scale_min_k4).
                    for i in 0..4 {
                        block[4 + i] = (sc[i] & 63) | ((sc[i + 4] >> 4) << 6);
                        block[4 + i + 4] = (m[i] & 63) | ((m[i + 4] >> 4) << 6);
                        block[4 + i + 8] = (sc[i + 4] & 0x0F) | ((m[i + 4] & 0x0F) << 4);
                    }
                }
            }
        }
    });
    Ok(out)
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
    fn dummy_ggml_blocks_dequantize_to_centred_weights_of_the_dummy_spread() {
        use crate::model::gguf::{dequantize, GgmlType as T};
        let (rows, cols) = (64, 512);
        for ty in [T::Q4_0, T::Q4_1, T::Q8_0, T::Q4_K, T::Q5_K, T::Q6_K] {
            let blocks = dummy_ggml_blocks(ty, rows, cols, 7).unwrap();
            assert_eq!(blocks.len(), rows * cols / ty.block_size() * ty.type_size(), "{ty:?}");
            assert_eq!(blocks, dummy_ggml_blocks(ty, rows, cols, 7).unwrap(), "{ty:?}: deterministic");
            assert_ne!(blocks, dummy_ggml_blocks(ty, rows, cols, 8).unwrap(), "{ty:?}: seeded");
            let mut w = vec![0.0f32; rows * cols];
            dequantize(ty, &blocks, rows * cols, &mut w).unwrap();
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
            assert!(w.iter().all(|v| v.is_finite()), "{ty:?}");
            // Q4_0 has no min: its uniform quants centre half a step (d / 2, about 2.2e-3) below 0.
            assert!(mean.abs() < 2.5e-3 && (0.012..0.03).contains(&std), "{ty:?}: mean {mean} std {std}");
        }
        assert!(dummy_ggml_blocks(T::Q2_K, rows, cols, 7).is_err(), "only the kept types");
        assert!(dummy_ggml_blocks(T::Q4_K, rows, 500, 7).is_err(), "whole blocks");
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
