//! Batch-invariant matrix products for the CPU forward: `out = a · wᵀ` where `w` is a linear
//! layer's `[n, k]` weight.
//!
//! Why our own kernel rather than a GEMM crate: a serving engine must give a sequence the same
//! logits whatever shares its batch, or "the same output alone and in a batch", chunked prefill
//! and recompute-after-preemption all drift at near-ties. The GEMM crates we measured change the
//! accumulation order with the number of rows (`gemm` has a separate matrix-vector path) or are
//! slow for the one-to-sixteen-row products that decode is made of (`matrixmultiply` repacks the
//! whole weight on every call). Here every output element is computed in one fixed order,
//! whatever `m` is and however the work is tiled or split across threads:
//!
//! - 16 lane accumulators; lane `l` sums `a[kk] * w[kk]` (fused multiply-add) for
//!   `kk ≡ l (mod 16)`, `kk < k - k % 16`, in increasing `kk`;
//! - the lanes are reduced as a fixed tree: `l + 8`, then `+ 4`, `+ 2`, `+ 1`;
//! - the `k % 16` tail elements are then added one by one with fused multiply-adds.
//!
//! The AVX-512 path, the AVX2 path (two 8-lane registers) and the portable path all follow it,
//! so results are identical across them too. Tiles are 4 rows of `a` by 4 rows of `w`; rows of
//! `a` are blocked by 64 so they stay in L2 while a block of weights is reused from L1.

use rayon::prelude::*;

const LANES: usize = 16;
const TILE_M: usize = 4;
const TILE_N: usize = 4;
const BLOCK_M: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(detect_isa)
}

/// Raw output pointer shared by the threads; each writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (distinct column ranges), see `matmul_wt`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m×n] = a[m×k] · wᵀ`, with `w` row-major `[n×k]`.
pub fn matmul_wt(out: &mut [f32], a: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(a.len(), m * k, "lhs is not {m}x{k}");
    assert_eq!(w.len(), n * k, "weight is not {n}x{k}");
    assert_eq!(out.len(), m * n, "output is not {m}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    let isa = isa();
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Enough column chunks to keep every thread busy, each a multiple of the tile width.
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n.div_ceil(threads * 8)).next_multiple_of(TILE_N).max(TILE_N);
    let work = m * n * k;
    let run_chunk = |j_start: usize| {
        let j_end = (j_start + chunk).min(n);
        // SAFETY: columns j_start..j_end of every row belong to this call alone.
        unsafe { matmul_columns(isa, out_ptr, a, w, m, k, n, j_start, j_end) };
    };
    if work < 1 << 15 || threads == 1 {
        (0..n).step_by(chunk).for_each(run_chunk);
    } else {
        (0..n).into_par_iter().step_by(chunk).for_each(run_chunk);
    }
}

/// Computes columns `j_start..j_end` of every row of the output.
///
/// # Safety
/// `out` must point to an `m × n` array whose columns `j_start..j_end` no one else touches now.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_columns(isa: Isa, out: OutPtr, a: &[f32], w: &[f32], m: usize, k: usize, n: usize, j_start: usize, j_end: usize) {
    for i_block in (0..m).step_by(BLOCK_M) {
        let i_block_end = (i_block + BLOCK_M).min(m);
        let mut j = j_start;
        while j < j_end {
            let nr = (j_end - j).min(TILE_N);
            // While this tile's weights are used, the next tile's are fetched into L1, so the
            // memory stream overlaps the arithmetic instead of stalling it.
            let next = (j + nr).min(j_end.saturating_sub(1));
            let prefetch: [&[f32]; TILE_N] = std::array::from_fn(|c| &w[(next + c).min(n - 1) * k..][..k]);
            let mut i = i_block;
            while i < i_block_end {
                let mr = (i_block_end - i).min(TILE_M);
                tile(isa, out, a, w, k, n, i, mr, j, nr, &prefetch);
                i += mr;
            }
            j += nr;
        }
    }
}

/// One `mr × nr` tile (both at most 4) at rows `i..`, columns `j..`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(
    isa: Isa,
    out: OutPtr,
    a: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    i: usize,
    mr: usize,
    j: usize,
    nr: usize,
    prefetch: &[&[f32]; TILE_N],
) {
    let mut sums = [[0.0f32; TILE_N]; TILE_M];
    let a_rows: [&[f32]; TILE_M] = std::array::from_fn(|r| &a[(i + r.min(mr - 1)) * k..][..k]);
    let w_rows: [&[f32]; TILE_N] = std::array::from_fn(|c| &w[(j + c.min(nr - 1)) * k..][..k]);
    // Monomorphized per row count so a one-row (decode) tile does a quarter of the work.
    macro_rules! dispatch {
        ($($kernel:ident)::+) => {
            match mr {
                1 => $($kernel)::+::<1>(&a_rows, &w_rows, nr, &mut sums, prefetch),
                2 => $($kernel)::+::<2>(&a_rows, &w_rows, nr, &mut sums, prefetch),
                3 => $($kernel)::+::<3>(&a_rows, &w_rows, nr, &mut sums, prefetch),
                _ => $($kernel)::+::<4>(&a_rows, &w_rows, nr, &mut sums, prefetch),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => dispatch!(x86::dots_avx512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => dispatch!(x86::dots_avx2),
        _ => dispatch!(dots_portable),
    }
    let body = k - k % LANES;
    for r in 0..mr {
        for c in 0..nr {
            let mut s = sums[r][c];
            for kk in body..k {
                s = a_rows[r][kk].mul_add(w_rows[c][kk], s);
            }
            *out.0.add((i + r) * n + j + c) = s;
        }
    }
}

/// The fixed reduction tree over 16 lanes: `l + 8`, `+ 4`, `+ 2`, `+ 1`.
#[inline]
fn reduce_lanes(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

fn dots_portable<const MR: usize>(
    a: &[&[f32]; TILE_M],
    w: &[&[f32]; TILE_N],
    nr: usize,
    sums: &mut [[f32; TILE_N]; TILE_M],
    _prefetch: &[&[f32]; TILE_N],
) {
    let body = a[0].len() - a[0].len() % LANES;
    for r in 0..MR {
        for c in 0..nr {
            let mut acc = [0.0f32; LANES];
            for base in (0..body).step_by(LANES) {
                for (l, lane) in acc.iter_mut().enumerate() {
                    *lane = a[r][base + l].mul_add(w[c][base + l], *lane);
                }
            }
            sums[r][c] = reduce_lanes(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{reduce_lanes, LANES, TILE_M, TILE_N};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; every row must be at least as long as `a[0]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots_avx512<const MR: usize>(
        a: &[&[f32]; TILE_M],
        w: &[&[f32]; TILE_N],
        nr: usize,
        sums: &mut [[f32; TILE_N]; TILE_M],
        prefetch: &[&[f32]; TILE_N],
    ) {
        let body = a[0].len() - a[0].len() % LANES;
        let mut acc = [[_mm512_setzero_ps(); TILE_N]; MR];
        let mut base = 0;
        while base < body {
            for p in prefetch {
                _mm_prefetch::<_MM_HINT_T0>(p.as_ptr().add(base) as *const i8);
            }
            let wv: [__m512; TILE_N] = std::array::from_fn(|c| _mm512_loadu_ps(w[c].as_ptr().add(base)));
            for r in 0..MR {
                let av = _mm512_loadu_ps(a[r].as_ptr().add(base));
                for c in 0..TILE_N {
                    acc[r][c] = _mm512_fmadd_ps(av, wv[c], acc[r][c]);
                }
            }
            base += LANES;
        }
        for r in 0..MR {
            for c in 0..nr {
                let mut lanes = [0.0f32; LANES];
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
                sums[r][c] = reduce_lanes(&lanes);
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; every row must be at least as long as `a[0]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_avx2<const MR: usize>(
        a: &[&[f32]; TILE_M],
        w: &[&[f32]; TILE_N],
        nr: usize,
        sums: &mut [[f32; TILE_N]; TILE_M],
        prefetch: &[&[f32]; TILE_N],
    ) {
        let body = a[0].len() - a[0].len() % LANES;
        // Lanes 0..8 in `lo`, 8..16 in `hi`: the same 16 accumulators as the AVX-512 path.
        let mut lo = [[_mm256_setzero_ps(); TILE_N]; MR];
        let mut hi = [[_mm256_setzero_ps(); TILE_N]; MR];
        let mut base = 0;
        while base < body {
            for p in prefetch {
                _mm_prefetch::<_MM_HINT_T0>(p.as_ptr().add(base) as *const i8);
            }
            for c in 0..TILE_N {
                let w_lo = _mm256_loadu_ps(w[c].as_ptr().add(base));
                let w_hi = _mm256_loadu_ps(w[c].as_ptr().add(base + 8));
                for r in 0..MR {
                    lo[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(a[r].as_ptr().add(base)), w_lo, lo[r][c]);
                    hi[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(a[r].as_ptr().add(base + 8)), w_hi, hi[r][c]);
                }
            }
            base += LANES;
        }
        for r in 0..MR {
            for c in 0..nr {
                let mut lanes = [0.0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), lo[r][c]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[r][c]);
                sums[r][c] = reduce_lanes(&lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32) * seed).sin()).collect()
    }

    #[test]
    fn matches_naive_for_odd_shapes() {
        for (m, k, n) in [(1, 1, 1), (3, 37, 5), (5, 16, 9), (17, 100, 13), (70, 33, 6)] {
            let (a, w) = (data(m * k, 0.37), data(n * k, 0.11));
            let mut out = vec![0.0; m * n];
            matmul_wt(&mut out, &a, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let expected: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64).sum();
                    assert!((out[i * n + j] as f64 - expected).abs() < 1e-4, "{m}x{k}x{n} at {i},{j}");
                }
            }
        }
    }

    #[test]
    fn each_row_is_bitwise_independent_of_the_batch() {
        let (k, n) = (576, 203);
        let w = data(n * k, 0.001);
        let a = data(80 * k, 0.0137);
        let mut alone = vec![0.0; n];
        matmul_wt(&mut alone, &a[..k], &w, 1, k, n);
        for m in [2, 3, 4, 5, 16, 63, 64, 65, 80] {
            let mut out = vec![0.0; m * n];
            matmul_wt(&mut out, &a[..m * k], &w, m, k, n);
            assert!(out[..n].iter().zip(&alone).all(|(x, y)| x.to_bits() == y.to_bits()), "row 0 differs at m={m}");
        }
        // The same row at another position of a batch.
        let mut out = vec![0.0; 7 * n];
        let mut shifted = a[k..7 * k].to_vec();
        shifted.extend_from_slice(&a[..k]);
        matmul_wt(&mut out, &shifted, &w, 7, k, n);
        assert!(out[6 * n..].iter().zip(&alone).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn simd_paths_agree_with_the_portable_path_bitwise() {
        let k = 16 * 5 + 3;
        let (a, w) = (data(TILE_M * k, 0.3), data(TILE_N * k, 0.7));
        let a_rows: [&[f32]; TILE_M] = std::array::from_fn(|r| &a[r * k..][..k]);
        let w_rows: [&[f32]; TILE_N] = std::array::from_fn(|c| &w[c * k..][..k]);
        let mut portable = [[0.0; TILE_N]; TILE_M];
        dots_portable::<TILE_M>(&a_rows, &w_rows, TILE_N, &mut portable, &w_rows);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                let mut avx2 = [[0.0; TILE_N]; TILE_M];
                unsafe { x86::dots_avx2::<TILE_M>(&a_rows, &w_rows, TILE_N, &mut avx2, &w_rows) };
                assert_eq!(avx2, portable);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut avx512 = [[0.0; TILE_N]; TILE_M];
                unsafe { x86::dots_avx512::<TILE_M>(&a_rows, &w_rows, TILE_N, &mut avx512, &w_rows) };
                assert_eq!(avx512, portable);
            }
        }
    }
}
