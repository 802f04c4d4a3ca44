//! Skinny bf16 products on the tensor cores (`kernels/skinny.cu`): `out[m×n] = x[m×k] · Wᵀ` for a
//! few tens of input rows, where a linear layer is still a weight stream. Owns the kernel's
//! launch plan (how many splits of K fill the GPU once), its device workspace (split-K partials
//! and the per-row-group arrival counters the kernel leaves at zero) and which row counts take
//! it (`PAGEDSERVE_SKINNY`).
//!
//! Invariants: the constants here are the kernel's `SK_*` (a unit test reads the source); the
//! workspace is allocated once with the device, before any graph capture, and a plan never
//! needs more of it than there is; K is a multiple of `KC` and the pointers 16-byte aligned.

use std::ops::RangeInclusive;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use super::gemm::OutType;
use super::{launchers, CudaError, GpuDevice};

/// Warps a block (each 16 weight rows), K values a chunk, ring stages, and the staged slice of
/// the input (K values times tiles): the kernel's `SK_WARPS`, `SK_KC`, `SK_STAGES`, `SK_SLICE`.
pub const WARPS: usize = 16;
pub const KC: usize = 64;
pub const STAGES: usize = 4;
pub const SLICE: usize = 2048;
/// bf16 of padding a staged input row (`SK_XPAD`).
pub const XPAD: usize = 8;
/// Weight rows a block covers.
pub const ROWS_PER_BLOCK: usize = 16 * WARPS;
/// Tiles of 8 input rows the kernels are instantiated for.
pub const TILES: [usize; 4] = [1, 2, 4, 8];
/// Float32 split-K partials the workspace holds (16 MB: the 8B o-projection at 64 rows in 8
/// splits takes 8.4 MB).
const PARTIAL_FLOATS: usize = 4 << 20;
/// Row groups the arrival counters cover (2M weight rows).
const ARRIVAL_COUNTERS: usize = 8192;

/// Tiles of 8 input rows for `m` rows, or `None` past 64.
pub fn tiles_for(m: usize) -> Option<usize> {
    TILES.into_iter().find(|&t| m <= 8 * t)
}

/// Dynamic shared memory of a block: the warps' rings, then two staged slices of the input.
pub fn shared_bytes(tiles: usize) -> usize {
    WARPS * STAGES * 4 * 32 * 16 + 2 * (8 * tiles) * (SLICE / tiles + XPAD) * 2
}

/// What the kernel reads as its input rows (`SK_PLAIN`, `SK_SILU`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkinnyInput {
    /// bf16 `[m, k]`.
    Plain(CUdeviceptr),
    /// A gated MLP's bf16 gate_up `[m, 2k]`: the input is silu(gate) · up, computed as the
    /// kernel stages it (`silu_and_mul`'s formula and rounding).
    SiluMul(CUdeviceptr),
}

pub fn kernel_name(tiles: usize, silu: bool) -> String {
    format!("gemv_mma_{}n{tiles}", if silu { "silu_" } else { "" })
}

/// How one product is cut: row groups of `ROWS_PER_BLOCK` (the grid's x) times splits of K (y).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub tiles: usize,
    pub groups: usize,
    pub splits: usize,
    pub k_per_split: usize,
}

impl Plan {
    /// One block a multiprocessor fits (its ~195 KB of shared memory), so the grid aims at one
    /// wave: as many splits of K as leave no multiprocessor without a block, no more (each split
    /// adds a float32 partial of the output to write and add back). Products with a row group
    /// for every multiprocessor (the 8B gate-up and head) are not split; the 8B QKV (24 groups)
    /// takes 5 splits, the o and down projections (16 groups) 8. `None` when the kernel does not
    /// take the shape.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> Option<Plan> {
        let tiles = tiles_for(m)?;
        if m == 0 || n == 0 || k == 0 || !k.is_multiple_of(KC) {
            return None;
        }
        let groups = n.div_ceil(ROWS_PER_BLOCK);
        if groups > ARRIVAL_COUNTERS {
            return None;
        }
        let chunks = k / KC;
        let mut splits = (num_sms / groups).clamp(1, chunks);
        while splits > 1 && splits * m * n > PARTIAL_FLOATS {
            splits -= 1;
        }
        let chunks_per_split = chunks.div_ceil(splits);
        Some(Plan { tiles, groups, splits: chunks.div_ceil(chunks_per_split), k_per_split: chunks_per_split * KC })
    }
}

/// The kernel's workspace on one device, and the row counts that take it.
pub struct Skinny {
    partials: CudaSlice<f32>,
    arrivals: CudaSlice<u32>,
    /// Input row counts that go to the kernel instead of cuBLAS (`PAGEDSERVE_SKINNY`).
    pub rows: RangeInclusive<usize>,
}

impl Skinny {
    /// `$PAGEDSERVE_SKINNY`: `off` (the default: on an H100 a layer's 8B products took 1.10-1.51x
    /// cuBLAS's time at 2-64 rows, BENCHMARKS.md session 25), `on` (rows 2 to 64), or `A-B` (rows
    /// A to B, within 1 to 64). `Ok(None)` when off.
    pub fn rows_from_env() -> Result<Option<RangeInclusive<usize>>, CudaError> {
        super::launch::parse_row_range("PAGEDSERVE_SKINNY", std::env::var("PAGEDSERVE_SKINNY").ok().as_deref(), 2..=64, 64).map_err(CudaError::Config)
    }

    pub fn new(stream: &Arc<CudaStream>, rows: RangeInclusive<usize>) -> Result<Skinny, CudaError> {
        Ok(Skinny { partials: stream.alloc_zeros(PARTIAL_FLOATS)?, arrivals: stream.alloc_zeros(ARRIVAL_COUNTERS)?, rows })
    }
}

/// Whether the skinny kernel is on for `m` input rows of `k` values on `dev` (whatever the
/// weight's rows): what a fused input may be left pending for.
pub fn takes(dev: &GpuDevice, m: usize, k: usize) -> bool {
    dev.skinny.as_ref().is_some_and(|s| s.rows.contains(&m)) && k.is_multiple_of(KC)
}

/// Whether `out[m×n] = x[m×k] · wᵀ` (bf16 weights) goes to the skinny kernel on `dev`.
pub fn prefers(dev: &GpuDevice, m: usize, k: usize, n: usize) -> bool {
    takes(dev, m, k) && Plan::new(m, n, k, dev.num_sms).is_some()
}

/// `out[m×n] = x[m×k] · wᵀ` through the skinny kernel (`prefers` said yes).
///
/// # Safety
/// `out`, the input and `w` must be live device allocations of at least `m*n` (of `out_type`),
/// `m*k` (`2*m*k` for `SiluMul`) and `n*k` bf16 elements, the input and `w` 16-byte aligned, on
/// `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn skinny_linear(
    dev: &GpuDevice,
    out: CUdeviceptr,
    out_type: OutType,
    input: SkinnyInput,
    w: CUdeviceptr,
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), CudaError> {
    let skinny = dev.skinny.as_ref().ok_or_else(|| CudaError::Config("the skinny kernel is off on this device".into()))?;
    let plan = Plan::new(m, n, k, dev.num_sms).ok_or_else(|| CudaError::Config(format!("the skinny kernel does not take m {m}, n {n}, k {k}")))?;
    let (x, silu) = match input {
        SkinnyInput::Plain(x) => (x, false),
        SkinnyInput::SiluMul(gate_up) => (gate_up, true),
    };
    if !(x | w).is_multiple_of(16) {
        return Err(CudaError::Config("the skinny kernel reads 16-byte vectors: unaligned operands".into()));
    }
    let config = LaunchConfig {
        grid_dim: (plan.groups as u32, plan.splits as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: shared_bytes(plan.tiles) as u32,
    };
    let (partials, _) = skinny.partials.device_ptr(&dev.stream);
    let (arrivals, _) = skinny.arrivals.device_ptr(&dev.stream);
    launchers::gemv_mma(
        dev,
        plan.tiles,
        silu,
        config,
        out,
        i32::from(out_type == OutType::F32),
        x,
        w,
        partials,
        arrivals,
        m as i32,
        n as i32,
        k as i32,
        plan.k_per_split as i32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_kernel() {
        let source = pagedserve_kernels::MODULES.iter().find(|m| m.name == "skinny").unwrap().source;
        for (name, value) in [("SK_WARPS", WARPS), ("SK_KC", KC), ("SK_STAGES", STAGES), ("SK_SLICE", SLICE), ("SK_XPAD", XPAD)] {
            assert!(source.contains(&format!("#define {name} {value}\n")), "{name}");
        }
        for tiles in TILES {
            assert!(source.contains(&format!("SKINNY_KERNEL({}, {tiles}, SK_PLAIN)", kernel_name(tiles, false))), "{tiles} tiles");
            assert!(source.contains(&format!("SKINNY_KERNEL({}, {tiles}, SK_SILU)", kernel_name(tiles, true))), "{tiles} tiles, SiLU");
        }
    }

    #[test]
    fn plans_fill_the_gpu_once_and_cover_k() {
        // The 8B products at 32 rows on 132 multiprocessors.
        let plan = |n, k| Plan::new(32, n, k, 132).unwrap();
        assert_eq!(plan(6144, 4096), Plan { tiles: 4, groups: 24, splits: 5, k_per_split: 832 });
        assert_eq!(plan(4096, 4096), Plan { tiles: 4, groups: 16, splits: 8, k_per_split: 512 });
        assert_eq!(plan(28672, 4096), Plan { tiles: 4, groups: 112, splits: 1, k_per_split: 4096 });
        assert_eq!(plan(4096, 14336), Plan { tiles: 4, groups: 16, splits: 8, k_per_split: 1792 });
        assert_eq!(plan(128_256, 4096).splits, 1);
        for (m, n, k) in [(9, 960, 576), (64, 576, 1536), (3, 100, 64), (17, 4096, 14336)] {
            let p = Plan::new(m, n, k, 132).unwrap();
            assert!(p.splits * p.k_per_split >= k && (p.splits - 1) * p.k_per_split < k, "{m} {n} {k}: {p:?}");
            assert!(p.splits * m * n <= PARTIAL_FLOATS);
            assert!(p.groups * ROWS_PER_BLOCK >= n && p.tiles * 8 >= m);
        }
        assert_eq!(Plan::new(65, 4096, 4096, 132), None, "past 64 rows");
        assert_eq!(Plan::new(8, 4096, 4000, 132), None, "K not a multiple of 64");
    }

    #[test]
    fn a_block_fits_the_shared_memory_of_sm_90() {
        for tiles in TILES {
            assert!(shared_bytes(tiles) <= 227 * 1024, "{tiles}: {}", shared_bytes(tiles));
        }
    }
}
