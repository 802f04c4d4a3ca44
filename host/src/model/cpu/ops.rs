//! The element-wise building blocks of the CPU forward: RMSNorm, SiLU-and-multiply, dot products.
//! (Matrix products are in `matmul`.)

/// `out = x / sqrt(mean(x²) + eps) * weight`, one row.
#[inline]
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mean_square = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
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
    }
}
