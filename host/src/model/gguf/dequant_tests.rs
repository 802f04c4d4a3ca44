//! Tests of the dequantizers on hand-built blocks: each test picks quants, scales and mins,
//! packs them into the ggml block layout, and checks the output against `d * scale * q - min`
//! computed independently of the kernels' unpacking code.

#![allow(clippy::needless_range_loop)] // index loops mirror the block layouts

use super::*;

fn f16b(x: f32) -> [u8; 2] {
    let h = f16::from_f32(x);
    assert_eq!(h.to_f32(), x, "test value {x} must be exact in f16");
    h.to_bits().to_le_bytes()
}

/// Deterministic pseudo-random values in `0..n`.
fn values(count: usize, n: u32, seed: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % n
        })
        .collect()
}

fn run(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.type_size() * ty.block_size();
    let mut out = vec![f32::NAN; n];
    dequantize(ty, bytes, n, &mut out).unwrap();
    out
}

#[test]
fn plain_types() {
    let v = [1.0f32, -2.5, 0.0, 65504.0, -0.000061035156];
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(run(GgmlType::F32, &bytes), v);
    let bytes: Vec<u8> = v.iter().flat_map(|&x| f16b(x)).collect();
    assert_eq!(run(GgmlType::F16, &bytes), v);
    // bf16 is the top half of an f32.
    let bytes: Vec<u8> = [0x3f80u16, 0xc020, 0x0000, 0x4780]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    assert_eq!(run(GgmlType::BF16, &bytes), [1.0, -2.5, 0.0, 65536.0]);
    let bytes: Vec<u8> = [0.5f64, -3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(run(GgmlType::F64, &bytes), [0.5, -3.0]);
    assert_eq!(run(GgmlType::I8, &[0xff, 7]), [-1.0, 7.0]);
    let bytes: Vec<u8> = [-300i16, 300]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(run(GgmlType::I16, &bytes), [-300.0, 300.0]);
    let bytes: Vec<u8> = [-70000i32, 5]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(run(GgmlType::I32, &bytes), [-70000.0, 5.0]);
}

#[test]
fn q4_0_low_nibbles_first() {
    let d = 0.5f32;
    let mut blk = f16b(d).to_vec();
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = run(GgmlType::Q4_0, &blk);
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * d);
        assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * d);
    }
}

#[test]
fn q4_1_scale_and_min() {
    let (d, m) = (0.25f32, -1.5f32);
    let q = values(32, 16, 1);
    let mut blk = [f16b(d), f16b(m)].concat();
    blk.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
    let out = run(GgmlType::Q4_1, &blk);
    for e in 0..32 {
        assert_eq!(out[e], q[e] as f32 * d + m, "element {e}");
    }
}

/// Packs 32 five-bit quants as Q5_0/Q5_1: nibbles like Q4, fifth bits in a little-endian u32.
fn pack_q5(q: &[u32]) -> (Vec<u8>, Vec<u8>) {
    let mut qh = 0u32;
    for (e, &v) in q.iter().enumerate() {
        qh |= (v >> 4) << e;
    }
    let qs = (0..16)
        .map(|j| ((q[j] & 15) | ((q[j + 16] & 15) << 4)) as u8)
        .collect();
    (qh.to_le_bytes().to_vec(), qs)
}

#[test]
fn q5_0_fifth_bit() {
    let d = -0.125f32;
    let q = values(32, 32, 2);
    let (qh, qs) = pack_q5(&q);
    let blk = [f16b(d).to_vec(), qh, qs].concat();
    let out = run(GgmlType::Q5_0, &blk);
    for e in 0..32 {
        assert_eq!(out[e], (q[e] as f32 - 16.0) * d, "element {e}");
    }
}

#[test]
fn q5_1_fifth_bit_and_min() {
    let (d, m) = (0.0625f32, 2.0f32);
    let q = values(32, 32, 3);
    let (qh, qs) = pack_q5(&q);
    let blk = [f16b(d).to_vec(), f16b(m).to_vec(), qh, qs].concat();
    let out = run(GgmlType::Q5_1, &blk);
    for e in 0..32 {
        assert_eq!(out[e], q[e] as f32 * d + m, "element {e}");
    }
}

#[test]
fn q8_0_signed_quants() {
    let d = 0.0078125f32;
    let q: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    let mut blk = f16b(d).to_vec();
    blk.extend(q.iter().map(|&v| v as u8));
    let out = run(GgmlType::Q8_0, &blk);
    for e in 0..32 {
        assert_eq!(out[e], f32::from(q[e]) * d, "element {e}");
    }
}

#[test]
fn q2_k_block() {
    let (d, dmin) = (0.5f32, 0.25f32);
    let q = values(256, 4, 4);
    let sc = values(16, 16, 5);
    let mn = values(16, 16, 6);
    let scales: Vec<u8> = (0..16).map(|i| (sc[i] | (mn[i] << 4)) as u8).collect();
    // Element e = 128n + 32j + l sits in qs[32n + l] at bits 2j.
    let mut qs = [0u8; 64];
    for e in 0..256 {
        let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
        qs[32 * n + l] |= (q[e] << (2 * j)) as u8;
    }
    let blk = [scales, qs.to_vec(), f16b(d).to_vec(), f16b(dmin).to_vec()].concat();
    let out = run(GgmlType::Q2_K, &blk);
    for e in 0..256 {
        let g = e / 16;
        let want = d * sc[g] as f32 * q[e] as f32 - dmin * mn[g] as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

#[test]
fn q3_k_block() {
    let d = 0.25f32;
    let q: Vec<i32> = values(256, 8, 7).iter().map(|&v| v as i32 - 4).collect();
    let s = values(16, 64, 8); // 6-bit scales, used as s - 32
    let mut packed = [0u8; 12];
    for (i, &v) in s.iter().enumerate() {
        let low = (v & 15) as u8;
        if i < 8 {
            packed[i] |= low;
        } else {
            packed[i - 8] |= low << 4;
        }
        packed[8 + i % 4] |= ((v >> 4) as u8) << (2 * (i / 4));
    }
    // The packing must read back through ggml's own kmask unpacking.
    let mut aux = [0u32; 4];
    for (k, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes(packed[4 * k..4 * k + 4].try_into().unwrap());
    }
    let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | ((tmp & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    let unpacked: Vec<u32> = aux
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .map(u32::from)
        .collect();
    assert_eq!(unpacked, s);

    // Element e = 128n + 32j + l: low bits in qs[32n + l] at 2j, high bit in hmask[l] at 4n + j
    // (set: q = low; clear: q = low - 4).
    let mut qs = [0u8; 64];
    let mut hmask = [0u8; 32];
    for e in 0..256 {
        let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
        let (low, high) = if q[e] >= 0 { (q[e], 1) } else { (q[e] + 4, 0) };
        qs[32 * n + l] |= (low as u8) << (2 * j);
        hmask[l] |= high << (4 * n + j);
    }
    let blk = [
        hmask.to_vec(),
        qs.to_vec(),
        packed.to_vec(),
        f16b(d).to_vec(),
    ]
    .concat();
    let out = run(GgmlType::Q3_K, &blk);
    for e in 0..256 {
        let want = d * (s[e / 16] as i32 - 32) as f32 * q[e] as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

/// Packs eight 6-bit scales and mins the way ggml's `get_scale_min_k4` reads them.
fn pack_k4_scales(sc: &[u32], mn: &[u32]) -> Vec<u8> {
    let mut b = [0u8; 12];
    for j in 0..4 {
        b[j] = (sc[j] | ((sc[j + 4] >> 4) << 6)) as u8;
        b[j + 4] = (mn[j] | ((mn[j + 4] >> 4) << 6)) as u8;
        b[j + 8] = ((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)) as u8;
    }
    b.to_vec()
}

#[test]
fn q4_k_block() {
    let (d, dmin) = (0.125f32, 0.5f32);
    let q = values(256, 16, 9);
    let sc = values(8, 64, 10);
    let mn = values(8, 64, 11);
    // Element e: 64-chunk c = e / 64 uses qs[32c + e % 32], low nibble in its first half.
    let mut qs = [0u8; 128];
    for e in 0..256 {
        let (c, hi, l) = (e / 64, e % 64 / 32, e % 32);
        qs[32 * c + l] |= (q[e] << (4 * hi)) as u8;
    }
    let blk = [
        f16b(d).to_vec(),
        f16b(dmin).to_vec(),
        pack_k4_scales(&sc, &mn),
        qs.to_vec(),
    ]
    .concat();
    let out = run(GgmlType::Q4_K, &blk);
    for e in 0..256 {
        let g = e / 32;
        let want = d * sc[g] as f32 * q[e] as f32 - dmin * mn[g] as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

#[test]
fn q5_k_block() {
    let (d, dmin) = (0.25f32, 0.0625f32);
    let q = values(256, 32, 12);
    let sc = values(8, 64, 13);
    let mn = values(8, 64, 14);
    // Like Q4_K, plus the fifth bit of element e in qh[e % 32] at bit e / 32.
    let mut qs = [0u8; 128];
    let mut qh = [0u8; 32];
    for e in 0..256 {
        let (c, hi, l) = (e / 64, e % 64 / 32, e % 32);
        qs[32 * c + l] |= ((q[e] & 15) << (4 * hi)) as u8;
        qh[l] |= ((q[e] >> 4) << (e / 32)) as u8;
    }
    let blk = [
        f16b(d).to_vec(),
        f16b(dmin).to_vec(),
        pack_k4_scales(&sc, &mn),
        qh.to_vec(),
        qs.to_vec(),
    ]
    .concat();
    let out = run(GgmlType::Q5_K, &blk);
    for e in 0..256 {
        let g = e / 32;
        let want = d * sc[g] as f32 * q[e] as f32 - dmin * mn[g] as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

#[test]
fn q6_k_block() {
    let d = 0.03125f32;
    let q: Vec<i32> = values(256, 64, 15).iter().map(|&v| v as i32 - 32).collect();
    let sc: Vec<i8> = values(16, 256, 16).iter().map(|&v| v as u8 as i8).collect();
    // Element e = 128n + 32k + l: low 4 bits in ql[64n + 32(k & 1) + l] (high nibble for k >= 2),
    // high 2 bits in qh[32n + l] at bits 2k.
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for e in 0..256 {
        let (n, k, l) = (e / 128, e % 128 / 32, e % 32);
        let u = (q[e] + 32) as u8;
        ql[64 * n + 32 * (k & 1) + l] |= (u & 15) << (4 * (k / 2));
        qh[32 * n + l] |= (u >> 4) << (2 * k);
    }
    let blk = [
        ql.to_vec(),
        qh.to_vec(),
        sc.iter().map(|&s| s as u8).collect(),
        f16b(d).to_vec(),
    ]
    .concat();
    let out = run(GgmlType::Q6_K, &blk);
    for e in 0..256 {
        let want = d * f32::from(sc[e / 16]) * q[e] as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

#[test]
fn q8_k_block() {
    let d = 0.001f32;
    let q: Vec<i8> = values(256, 256, 17)
        .iter()
        .map(|&v| v as u8 as i8)
        .collect();
    let mut blk = d.to_le_bytes().to_vec();
    blk.extend(q.iter().map(|&v| v as u8));
    blk.extend([0u8; 32]);
    let out = run(GgmlType::Q8_K, &blk);
    for e in 0..256 {
        assert_eq!(out[e], d * f32::from(q[e]), "element {e}");
    }
}

#[test]
fn parallel_path_matches_block_by_block() {
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::Q6_K] {
        let n_blocks = 3 * PARALLEL_MIN_ELEMENTS / ty.block_size() + 7;
        let mut bytes: Vec<u8> = values(n_blocks * ty.type_size(), 256, 18)
            .iter()
            .map(|&v| v as u8)
            .collect();
        // Keep the f16 scales finite so outputs compare with ==.
        for blk in bytes.chunks_exact_mut(ty.type_size()) {
            let at = if ty == GgmlType::Q6_K { 208 } else { 0 };
            blk[at..at + 2].copy_from_slice(&f16b(0.5));
            if ty == GgmlType::Q4_K {
                blk[2..4].copy_from_slice(&f16b(0.25));
            }
        }
        let all = run(ty, &bytes);
        for (i, blk) in bytes.chunks_exact(ty.type_size()).enumerate() {
            let one = run(ty, blk);
            assert_eq!(
                &all[i * ty.block_size()..(i + 1) * ty.block_size()],
                &one[..],
                "{ty} block {i}"
            );
        }
    }
}

#[test]
fn size_mismatches_and_unsupported_types_are_errors() {
    let mut out = vec![0f32; 64];
    let e = dequantize(GgmlType::Q8_0, &[0; 34], 64, &mut out).unwrap_err();
    assert!(
        e.to_string().contains("34 bytes of data, expected 68"),
        "{e}"
    );
    let e = dequantize(GgmlType::Q8_0, &[0; 68], 64, &mut out[..10]).unwrap_err();
    assert!(e.to_string().contains("output has 10 slots"), "{e}");
    let e = dequantize(GgmlType::Q8_0, &[0; 34], 33, &mut out[..33]).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of the block size 32"),
        "{e}"
    );
    let e = dequantize(GgmlType::IQ2_XXS, &[0; 66], 256, &mut vec![0f32; 256]).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::UnsupportedDequant {
                ty: GgmlType::IQ2_XXS,
                ..
            }
        ),
        "{e}"
    );
    assert!(!can_dequantize(GgmlType::Q8_1));
    assert!(can_dequantize(GgmlType::Q4_K));
    dequantize(GgmlType::Q4_K, &[], 0, &mut []).unwrap();
}
