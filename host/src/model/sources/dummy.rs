//! Deterministic random weights for any Llama shape (`--load-format dummy`), for benchmarks on
//! sizes we cannot download. Each tensor's values depend only on its name and the seed, so two
//! runs (or the CPU and GPU backends) see the same model.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{ModelError, Tensor, WeightSource};

pub struct DummySource {
    seed: u64,
    /// Standard deviation of the matrices; norms are all ones, as freshly initialised models are.
    scale: f32,
}

impl DummySource {
    pub fn new(seed: u64) -> Self {
        DummySource { seed, scale: 0.02 }
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
        let data = if hf_name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            let mut rng = StdRng::seed_from_u64(self.tensor_seed(hf_name));
            // Uniform with the same standard deviation as N(0, scale): cheaper and bounded.
            let half_width = self.scale * 3f32.sqrt();
            (0..n).map(|_| rng.random_range(-half_width..half_width)).collect()
        };
        Tensor::new(expected_shape.to_vec(), data).map(Some)
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
