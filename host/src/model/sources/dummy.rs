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
