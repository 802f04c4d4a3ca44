//! Dequantization of ggml tensor data to f32, matching ggml's `dequantize_row_*` (ggml-quants.c)
//! and gguf-py's `gguf.quants` bit for bit: the same block layouts and the same float operations
//! in the same order. Large tensors are split into chunks of whole blocks and run on rayon.

use half::f16;
use rayon::prelude::*;

use super::error::GgufError;
use super::types::GgmlType;

/// Below this many elements a tensor is dequantized on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 17;
/// Elements per rayon task (a multiple of every block size).
const CHUNK_ELEMENTS: usize = 1 << 16;

/// A kernel converts whole blocks: `bytes.len() == n * type_size`, `out.len() == n * block_size`.
type Kernel = fn(&[u8], &mut [f32]);

/// Whether [`dequantize`] supports `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    kernel(ty).is_some()
}

/// Converts `n_elements` values of type `ty` stored in `bytes` to f32, into `out`.
///
/// `bytes` must hold exactly `n_elements / block_size` blocks and `out` exactly `n_elements`
/// slots; the order is ggml's (element `i` of the tensor's flat, `ne[0]`-innermost layout).
pub fn dequantize(
    ty: GgmlType,
    bytes: &[u8],
    n_elements: usize,
    out: &mut [f32],
) -> Result<(), GgufError> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let size_err = |detail: String| GgufError::DequantSize { ty, detail };
    if !n_elements.is_multiple_of(bs) {
        return Err(size_err(format!(
            "{n_elements} elements is not a multiple of the block size {bs}"
        )));
    }
    let n_bytes = (n_elements / bs)
        .checked_mul(ts)
        .ok_or_else(|| size_err(format!("{n_elements} elements overflow the byte size")))?;
    if bytes.len() != n_bytes {
        return Err(size_err(format!(
            "{} bytes of data, expected {n_bytes} for {n_elements} elements",
            bytes.len()
        )));
    }
    if out.len() != n_elements {
        return Err(size_err(format!(
            "output has {} slots, expected {n_elements}",
            out.len()
        )));
    }
    let kernel = kernel(ty).ok_or(GgufError::UnsupportedDequant {
        context: "dequantize".to_string(),
        ty,
    })?;
    if n_elements < PARALLEL_MIN_ELEMENTS {
        kernel(bytes, out);
    } else {
        let blocks_per_chunk = CHUNK_ELEMENTS / bs;
        out.par_chunks_mut(blocks_per_chunk * bs)
            .zip(bytes.par_chunks(blocks_per_chunk * ts))
            .for_each(|(o, b)| kernel(b, o));
    }
    Ok(())
}

fn kernel(ty: GgmlType) -> Option<Kernel> {
    use GgmlType::*;
    Some(match ty {
        F32 => f32_rows,
        F16 => f16_rows,
        BF16 => bf16_rows,
        F64 => f64_rows,
        I8 => i8_rows,
        I16 => i16_rows,
        I32 => i32_rows,
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        Q6_K => q6_k,
        Q8_K => q8_k,
        _ => return None,
    })
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(4).zip(out) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn f16_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2).zip(out) {
        *y = f16_at(b, 0);
    }
}

fn bf16_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2).zip(out) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

fn f64_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(8).zip(out) {
        *y = f64::from_le_bytes(b.try_into().unwrap_or_default()) as f32;
    }
}

fn i8_rows(bytes: &[u8], out: &mut [f32]) {
    for (&b, y) in bytes.iter().zip(out) {
        *y = f32::from(b as i8);
    }
}

fn i16_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2).zip(out) {
        *y = f32::from(i16::from_le_bytes([b[0], b[1]]));
    }
}

fn i32_rows(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(4).zip(out) {
        *y = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
    }
}

/// block_q4_0 {f16 d; u8 qs[16]}: x = ((q & 0xF) - 8) * d, low nibbles first.
fn q4_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let qs = &blk[2..18];
        for j in 0..16 {
            let x0 = i32::from(qs[j] & 0x0F) - 8;
            let x1 = i32::from(qs[j] >> 4) - 8;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

/// block_q4_1 {f16 d; f16 m; u8 qs[16]}: x = q * d + m.
fn q4_1(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let qs = &blk[4..20];
        for j in 0..16 {
            y[j] = f32::from(qs[j] & 0x0F) * d + m;
            y[j + 16] = f32::from(qs[j] >> 4) * d + m;
        }
    }
}

/// block_q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: x = ((q | high bit << 4) - 16) * d.
fn q5_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..22];
        for j in 0..16 {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let x0 = (u32::from(qs[j] & 0x0F) | xh0) as i32 - 16;
            let x1 = (u32::from(qs[j] >> 4) | xh1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

/// block_q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = (q | high bit << 4) * d + m.
fn q5_1(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let qs = &blk[8..24];
        for j in 0..16 {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let x0 = u32::from(qs[j] & 0x0F) | xh0;
            let x1 = u32::from(qs[j] >> 4) | xh1;
            y[j] = x0 as f32 * d + m;
            y[j + 16] = x1 as f32 * d + m;
        }
    }
}

/// block_q8_0 {f16 d; i8 qs[32]}: x = q * d.
fn q8_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        for (yj, &q) in y.iter_mut().zip(&blk[2..34]) {
            *yj = f32::from(q as i8) * d;
        }
    }
}

/// block_q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: 16 groups of 16, each with a 4-bit
/// scale and 4-bit min; 2-bit quants.
fn q2_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(84).zip(out.chunks_exact_mut(256)) {
        let scales = &blk[0..16];
        let d = f16_at(blk, 80);
        let min = f16_at(blk, 82);
        let mut is = 0;
        let mut yi = 0;
        for n in 0..2 {
            let q = &blk[16 + 32 * n..16 + 32 * n + 32];
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let sc = scales[is];
                    is += 1;
                    let dl = d * f32::from(sc & 0x0F);
                    let ml = min * f32::from(sc >> 4);
                    for l in 0..16 {
                        y[yi] = dl * f32::from((q[l + 16 * half] >> shift) & 3) - ml;
                        yi += 1;
                    }
                }
            }
        }
    }
}

/// block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 16 groups of 16 with 6-bit
/// signed scales; 2-bit quants plus a high bit in `hmask` (set means no -4 offset).
fn q3_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(110).zip(out.chunks_exact_mut(256)) {
        let hm = &blk[0..32];
        let packed = &blk[96..108];
        let d_all = f16_at(blk, 108);
        let mut scales = [0i32; 16];
        for (i, s) in scales.iter_mut().enumerate() {
            let low = if i < 8 {
                packed[i] & 0x0F
            } else {
                packed[i - 8] >> 4
            };
            let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
            *s = i32::from(low | (high << 4)) - 32;
        }
        let mut is = 0;
        let mut yi = 0;
        let mut m: u8 = 1;
        for n in 0..2 {
            let q = &blk[32 + 32 * n..32 + 32 * n + 32];
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let dl = d_all * scales[is] as f32;
                    is += 1;
                    for l in 16 * half..16 * half + 16 {
                        let q2 = i32::from((q[l] >> shift) & 3);
                        let off = if hm[l] & m != 0 { 0 } else { 4 };
                        y[yi] = dl * (q2 - off) as f32;
                        yi += 1;
                    }
                }
                m = m.wrapping_shl(1);
            }
        }
    }
}

/// ggml's `get_scale_min_k4`: the `j`-th 6-bit scale and min of a Q4_K/Q5_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: 8 groups of 32, x = d*sc*q - dmin*m.
fn q4_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(blk, 0);
        let min = f16_at(blk, 2);
        let scales = &blk[4..16];
        for j in 0..4 {
            let q = &blk[16 + 32 * j..16 + 32 * j + 32];
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
                y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// block_q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: Q4_K plus a fifth bit.
fn q5_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(blk, 0);
        let min = f16_at(blk, 2);
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        for j in 0..4 {
            let ql = &blk[48 + 32 * j..48 + 32 * j + 32];
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
                y[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
            }
        }
    }
}

/// block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 groups of 16, x = d*sc*(q-32).
fn q6_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(blk, 208);
        for n in 0..2 {
            let ql = &blk[64 * n..64 * n + 64];
            let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
            let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * f32::from(sc[is] as i8) * q1 as f32;
                y[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
                y[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
                y[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
            }
        }
    }
}

/// block_q8_K {f32 d; i8 qs[256]; i16 bsums[16]}: x = d * q.
fn q8_k(bytes: &[u8], out: &mut [f32]) {
    for (blk, y) in bytes.chunks_exact(292).zip(out.chunks_exact_mut(256)) {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        for (yj, &q) in y.iter_mut().zip(&blk[4..260]) {
            *yj = d * f32::from(q as i8);
        }
    }
}

#[cfg(test)]
#[path = "dequant_tests.rs"]
mod tests;
