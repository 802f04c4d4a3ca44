//! Rotary position embeddings in Hugging Face's rotate-half form: dimension `i` of a head pairs
//! with dimension `i + head_dim / 2`, rotated by `position * inv_freq[i]`.
//!
//! The inverse frequencies are computed in float32 the way transformers computes them
//! (`1 / base ** (2i / dim)`), so angles agree with the reference to the last bit or two.

use super::{ModelConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Positions are divided by this (linear scaling); 1 otherwise.
    position_scale: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut position_scale = 1.0;
        match &config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => position_scale = *factor,
            Some(RopeScaling::FreqFactors { factors }) => {
                for (f, factor) in inv_freq.iter_mut().zip(factors) {
                    *f /= factor;
                }
            }
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                // transformers' `_compute_llama3_parameters`.
                let old_len = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope { inv_freq, position_scale }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Cosines and sines for one position, each `head_dim / 2` long.
    pub fn cos_sin(&self, position: u32, cos: &mut [f32], sin: &mut [f32]) {
        let pos = position as f32 / self.position_scale;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = pos * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    /// Rotates every head of `x` (heads back to back, `head_dim` each) in place.
    #[inline]
    pub fn apply(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: Option<RopeScaling>) -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: scaling,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let rope = Rope::new(&config(None));
        assert_eq!(rope.inv_freq(), &[1.0, 0.01]);
        let (mut cos, mut sin) = ([0.0; 2], [0.0; 2]);
        let original = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.25, 2.0];
        let mut x = original;
        rope.cos_sin(0, &mut cos, &mut sin);
        Rope::apply(&mut x, 4, &cos, &sin);
        assert_eq!(x, original);
        rope.cos_sin(7, &mut cos, &mut sin);
        Rope::apply(&mut x, 4, &cos, &sin);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&original)).abs() < 1e-4);
        // Dimension 0 pairs with dimension 2 (rotate-half), by angle 7 * 1.0.
        let expected0 = 1.0 * 7f32.cos() - 3.0 * 7f32.sin();
        assert!((x[0] - expected0).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let scaled = Rope::new(&config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        })));
        // inv_freq 1.0 has wavelength 2*pi < 16: unchanged; 0.01 has wavelength 628 > 64: divided by 8.
        assert_eq!(scaled.inv_freq()[0], 1.0);
        assert!((scaled.inv_freq()[1] - 0.01 / 8.0).abs() < 1e-9);
    }
}
