//! The element-wise building blocks of the CPU forward: RMSNorm, the gated activations, dot
//! products. (Matrix products are in `matmul`.)

/// `out = x / sqrt(mean(x²) + eps) * weight`, one row.
#[inline]
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    rms_norm_scaled(out, x, weight, 0.0, eps);
}

/// `out = x / sqrt(mean(x²) + eps) * (offset + weight)`, one row (`offset` 1: Gemma's norms).
#[inline]
pub fn rms_norm_scaled(out: &mut [f32], x: &[f32], weight: &[f32], offset: f32, eps: f32) {
    let mean_square = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (offset + w) * (v * inv);
    }
}

/// `out[i] = gelu_tanh(gate[i]) * up[i]` where `gate_up` is one row of `[gate | up]`
/// (PyTorch's `gelu(approximate="tanh")`).
#[inline]
pub fn gelu_tanh_mul(out: &mut [f32], gate_up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let (gate, up) = gate_up.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = 0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh()) * u;
    }
}

/// `out[i] = silu(gate[i]) * up[i]` where `gate_up` is one row of `[gate | up]`.
#[inline]
pub fn silu_mul(out: &mut [f32], gate_up: &[f32]) {
    let (gate, up) = gate_up.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Dot product with eight independent accumulators so the compiler can vectorize it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_and_silu() {
        let mut out = [0.0; 2];
        rms_norm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
        let mut act = [0.0; 2];
        silu_mul(&mut act, &[0.0, 1.0, 5.0, 2.0]);
        assert_eq!(act[0], 0.0);
        assert!((act[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert_eq!(dot(&[1.0; 19], &[2.0; 19]), 38.0);
        // gelu_tanh(1) = 0.841192 (PyTorch), times up = 2.
        gelu_tanh_mul(&mut act, &[1.0, 0.0, 2.0, 3.0]);
        assert!((act[0] - 0.841_192 * 2.0).abs() < 1e-5 && act[1] == 0.0);
        rms_norm_scaled(&mut out, &[3.0, 4.0], &[0.0, 1.0], 1.0, 0.0);
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
    }
}
