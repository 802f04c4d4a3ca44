//! FP8 (E4M3) weights with one float32 scale per output channel, as vLLM's `--quantization fp8`
//! makes them from a bf16 checkpoint: for row r of a `[rows, cols]` matrix, `scale[r] =
//! max|w[r, :]| / 448` (448 is E4M3's largest finite value), `q[r, c] = e4m3(w[r, c] / scale[r])`
//! rounded to nearest even, and the product reads `q[r, c] · scale[r]`. One byte a weight, half of
//! bf16's, so a weight-bound decode step streams half the bytes.
//!
//! This module owns the format: quantizing on the host at load (a device store uploads `bytes`
//! and `scales`), dequantizing, and the error it makes. `CpuModel::with_fp8_projections` runs
//! the CPU forward on the dequantized values, which is what an FP8 product computes up to
//! accumulation order: that is how the quality of the format is measured against the reference.

use float8::F8E4M3;

/// E4M3's largest finite magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// `v` as an E4M3 bit pattern, rounded to nearest even and saturated at ±448 (as the GPU's
/// `cvt.rn.satfinite`); NaN stays NaN.
#[inline]
pub fn e4m3_bits(v: f32) -> u8 {
    F8E4M3::from_f32(v.clamp(-E4M3_MAX, E4M3_MAX)).to_bits()
}

/// The value of an E4M3 bit pattern (exact in float32), from a table.
#[inline]
pub fn e4m3_value(bits: u8) -> f32 {
    static TABLE: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| std::array::from_fn(|b| F8E4M3::from_bits(b as u8).to_f32()));
    TABLE[bits as usize]
}

/// A `[rows, cols]` matrix in E4M3 with a scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Row-major E4M3 bit patterns.
    pub bytes: Vec<u8>,
    /// One per row: the value of E4M3 1.0 in that row.
    pub scales: Vec<f32>,
}

impl Fp8Matrix {
    /// Quantizes row-major `data` of `rows × cols`. A row of zeros gets scale 1 (any scale
    /// represents it exactly); non-finite values are refused, since no scale represents them.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self, Fp8Error> {
        if data.len() != rows * cols {
            return Err(Fp8Error::Shape { rows, cols, len: data.len() });
        }
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(Fp8Error::NotFinite { row: at / cols.max(1), col: at % cols.max(1) });
        }
        let mut bytes = Vec::with_capacity(data.len());
        let mut scales = Vec::with_capacity(rows);
        for row in data.chunks_exact(cols.max(1)).take(rows) {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // A row of tiny values keeps a normal scale (amax / 448 would underflow to 0).
            let scale = if amax > 0.0 { (amax / E4M3_MAX).max(f32::MIN_POSITIVE) } else { 1.0 };
            // Dividing (not multiplying by 1/scale) keeps the row's largest value exactly at 448.
            bytes.extend(row.iter().map(|&v| e4m3_bits(v / scale)));
            scales.push(scale);
        }
        Ok(Fp8Matrix { rows, cols, bytes, scales })
    }

    /// The values the products read: `q · scale`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.bytes.len());
        for (row, &scale) in self.bytes.chunks_exact(self.cols.max(1)).zip(&self.scales) {
            out.extend(row.iter().map(|&b| e4m3_value(b) * scale));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fp8Error {
    #[error("{len} values do not make a {rows}x{cols} matrix")]
    Shape { rows: usize, cols: usize, len: usize },
    #[error("weight [{row}, {col}] is not finite; FP8 with a per-row scale cannot hold it")]
    NotFinite { row: usize, col: usize },
}

/// The error quantization made, summed over matrices: relative to each matrix's norm.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fp8Report {
    pub matrices: usize,
    pub weights: usize,
    /// sqrt(Σ (w - dq)²) / sqrt(Σ w²) over every weight quantized.
    pub relative_rms_error: f64,
    sum_sq_error: f64,
    sum_sq: f64,
}

impl Fp8Report {
    /// Adds one matrix's original and dequantized values.
    pub fn add(&mut self, original: &[f32], dequantized: &[f32]) {
        self.matrices += 1;
        self.weights += original.len();
        for (&w, &d) in original.iter().zip(dequantized) {
            self.sum_sq_error += f64::from(w - d).powi(2);
            self.sum_sq += f64::from(w).powi(2);
        }
        self.relative_rms_error = if self.sum_sq > 0.0 { (self.sum_sq_error / self.sum_sq).sqrt() } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_spans_e4m3_and_round_trips_within_its_precision() {
        let (rows, cols) = (3, 64);
        let mut data: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin() * 10f32.powi((i / cols) as i32 - 1)).collect();
        data[5] = -7.5; // row 0's largest magnitude, negative
        let q = Fp8Matrix::quantize(&data, rows, cols).unwrap();
        assert_eq!((q.bytes.len(), q.scales.len()), (rows * cols, rows));
        let back = q.dequantize();
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((q.scales[r] - amax / 448.0).abs() <= f32::EPSILON * q.scales[r]);
            // The largest magnitude is exactly ±448 in E4M3, so it comes back exactly.
            let at = row.iter().position(|v| v.abs() == amax).unwrap();
            assert_eq!(back[r * cols + at], row[at]);
            for c in 0..cols {
                let (w, d) = (row[c], back[r * cols + c]);
                // Three mantissa bits: a relative error of at most 2^-4 in the normal range,
                // and at most half the smallest subnormal step (2^-10 · scale) below it.
                assert!((w - d).abs() <= (w.abs() / 16.0).max(q.scales[r] * 2f32.powi(-10)) * 1.0001, "row {r} col {c}: {w} -> {d}");
            }
        }
    }

    #[test]
    fn the_table_and_the_rounding_agree_with_float8() {
        for b in 0..=255u8 {
            let v = F8E4M3::from_bits(b).to_f32();
            assert!(e4m3_value(b) == v || (v.is_nan() && e4m3_value(b).is_nan()), "{b:#x}");
            if v.is_finite() {
                assert_eq!(e4m3_bits(v), b, "{v} round-trips");
            }
        }
        // Saturation, not infinity or NaN, past the largest finite value; halfway rounds to even
        // (between 1.0 and 1.125: 1.0625 goes to 1.0, the even mantissa).
        assert_eq!(e4m3_value(e4m3_bits(1e6)), 448.0);
        assert_eq!(e4m3_value(e4m3_bits(-500.0)), -448.0);
        assert_eq!(e4m3_value(e4m3_bits(1.0625)), 1.0);
        assert!(e4m3_value(e4m3_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn zero_rows_and_bad_input() {
        let q = Fp8Matrix::quantize(&[0.0; 8], 2, 4).unwrap();
        assert_eq!(q.scales, vec![1.0, 1.0]);
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
        assert_eq!(Fp8Matrix::quantize(&[0.0; 7], 2, 4), Err(Fp8Error::Shape { rows: 2, cols: 4, len: 7 }));
        assert_eq!(Fp8Matrix::quantize(&[0.0, 1.0, f32::NAN, 0.0], 2, 2), Err(Fp8Error::NotFinite { row: 1, col: 0 }));
        // Subnormal weights: a finite scale, finite values back.
        let tiny = Fp8Matrix::quantize(&[1e-44, -3e-45], 1, 2).unwrap();
        assert!(tiny.scales[0] > 0.0 && tiny.dequantize().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_report_is_relative_to_the_weights() {
        let mut report = Fp8Report::default();
        report.add(&[3.0, 4.0], &[3.0, 4.0]);
        assert_eq!(report.relative_rms_error, 0.0);
        report.add(&[0.0], &[0.5]);
        assert_eq!((report.matrices, report.weights), (2, 3));
        assert!((report.relative_rms_error - 0.1).abs() < 1e-12, "0.5 / 5");
    }
}
