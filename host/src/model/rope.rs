//! Rotary position embeddings in Hugging Face's rotate-half form: dimension `i` of a head pairs
//! with dimension `i + rotary_dim / 2`, rotated by `position * inv_freq[i]`; dimensions past
//! `rotary_dim` (partial rotary) pass through.
//!
//! The inverse frequencies are computed in float32 the way transformers computes them
//! (`1 / base ** (2i / dim)`, then the scaling's adjustment), so angles agree with the reference
//! to the last bit or two.

use super::{ModelConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Positions are divided by this (linear scaling); 1 otherwise.
    position_scale: f32,
    /// Cosines and sines are multiplied by this (YaRN's attention factor); 1 otherwise.
    magnitude: f32,
}

impl Rope {
    /// The model's tables: index 0 rotates global layers, index 1 (when the model has one) the
    /// sliding-window layers (`ModelConfig::rope_local_theta`, unscaled); see
    /// `LayerAttention::rope`.
    pub fn tables(config: &ModelConfig) -> Vec<Rope> {
        let mut tables = vec![Rope::new(config.rope_theta, config.rotary_dim, config.rope_scaling.as_ref())];
        if let Some(local) = config.rope_local_theta {
            tables.push(Rope::new(local, config.rotary_dim, None));
        }
        tables
    }

    pub fn new(base: f32, dim: usize, scaling: Option<&RopeScaling>) -> Self {
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let (mut position_scale, mut magnitude) = (1.0, 1.0);
        match scaling {
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
            Some(RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor, truncate }) => {
                // transformers' `_compute_yarn_parameters`, in float64 where it uses Python floats.
                let (d, b, original) = (dim as f64, base as f64, *original_max_position_embeddings as f64);
                let correction_dim =
                    |rotations: f64| (d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * b.ln());
                let (mut low, mut high) = (correction_dim(*beta_fast as f64), correction_dim(*beta_slow as f64));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0) as f32, high.min(d - 1.0) as f32);
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interpolated = *f / factor;
                    *f = interpolated * (1.0 - extrapolation) + *f * extrapolation;
                }
                magnitude = *attention_factor;
            }
        }
        Rope { inv_freq, position_scale, magnitude }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Positions are divided by this before rotating (linear scaling).
    pub fn position_scale(&self) -> f32 {
        self.position_scale
    }

    /// Cosines and sines are multiplied by this (YaRN's attention factor); 1 otherwise.
    pub fn magnitude(&self) -> f32 {
        self.magnitude
    }

    /// Cosines and sines for one position, each `rotary_dim / 2` long.
    pub fn cos_sin(&self, position: u32, cos: &mut [f32], sin: &mut [f32]) {
        let pos = position as f32 / self.position_scale;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = pos * f;
            *c = angle.cos() * self.magnitude;
            *s = angle.sin() * self.magnitude;
        }
    }

    /// Rotates the first `2 * cos.len()` dimensions of every head of `x` (heads back to back,
    /// `head_dim` each) in place.
    #[inline]
    pub fn apply(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head[..2 * half].split_at_mut(half);
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

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let rope = Rope::new(10_000.0, 4, None);
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
    fn partial_rotary_leaves_the_tail_of_each_head_alone() {
        let rope = Rope::new(10_000.0, 2, None);
        let (mut cos, mut sin) = ([0.0; 1], [0.0; 1]);
        rope.cos_sin(3, &mut cos, &mut sin);
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        Rope::apply(&mut x, 4, &cos, &sin);
        assert_eq!((x[2], x[3], x[6], x[7]), (3.0, 4.0, 7.0, 8.0));
        assert!((x[0] - (1.0 * 3f32.cos() - 2.0 * 3f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let scaled = Rope::new(
            10_000.0,
            4,
            Some(&RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 }),
        );
        // inv_freq 1.0 has wavelength 2*pi < 16: unchanged; 0.01 has wavelength 628 > 64: divided by 8.
        assert_eq!(scaled.inv_freq()[0], 1.0);
        assert!((scaled.inv_freq()[1] - 0.01 / 8.0).abs() < 1e-9);
    }

    #[test]
    fn yarn_keeps_high_frequencies_interpolates_low_ones_and_scales_magnitude() {
        let plain = Rope::new(10_000.0, 64, None);
        let yarn = Rope::new(
            10_000.0,
            64,
            Some(&RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 2048,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 1.5,
                truncate: true,
            }),
        );
        assert_eq!(yarn.inv_freq()[0], plain.inv_freq()[0]);
        assert!((yarn.inv_freq()[31] - plain.inv_freq()[31] / 4.0).abs() < 1e-12);
        let (mut cos, mut sin) = ([0.0; 32], [0.0; 32]);
        yarn.cos_sin(0, &mut cos, &mut sin);
        assert_eq!(cos[0], 1.5);
    }
}
