//! bf16 products of a few rows through cuBLASLt with the algorithm chosen by timing
//! (`PAGEDSERVE_BLAS_TUNE=on|A-B`, off by default). At 2-64 rows a linear layer is a weight
//! stream, and cuBLAS's heuristic (what `cublasGemmEx` runs) leaves bandwidth behind on the
//! smaller 8B shapes: Nsight Compute put the QKV product at 32 rows on 96 blocks of 132
//! multiprocessors at 64% of DRAM peak, and the o and down products behind a second split-K
//! reduce launch (BENCHMARKS.md, session 23). Here the first product of each shape outside a
//! graph capture times up to `CANDIDATES` (or `$PAGEDSERVE_BLAS_TUNE_CANDIDATES`) of the
//! heuristic's algorithms on the real operands,
//! each run after the L2 is flushed (a weight stream must not be timed from L2), and keeps the
//! fastest; later products of the shape, and the graphs captured after the warm-up run that
//! tuned them, use it.
//!
//! Measured on an H100 (BENCHMARKS.md, session 26), the 8B shapes: the eager products of a step
//! 1.3-1.7% shorter at 8 and 32 rows, the served decode step 0.4-0.8% (7.091-7.118 ms against
//! 7.144-7.149 at 32 rows), within noise at times; `check` 548 of 548 with it on. cuBLAS's own
//! heuristic is close to the best of its first eight, so the path stays off by default.
//! `RUST_LOG=pagedserve=info` prints each shape's heuristic and best times.
//!
//! The choice is made at run time, so two servers may pick different algorithms for a shape and
//! round a few outputs differently (a split K changes the order of the sums). A shape first met
//! inside a capture takes the heuristic's first choice, without timing, and is timed at its
//! first use outside one.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::RangeInclusive;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::{CUdeviceptr, CUevent_flags, CUstreamCaptureStatus};

use super::blaslt::{Handle, Plan};
use super::gemm::OutType;
use super::{CudaError, GpuDevice};

/// Algorithms timed per shape (the heuristic's first ones), unless
/// `PAGEDSERVE_BLAS_TUNE_CANDIDATES` says how many, up to `MOST_CANDIDATES`.
const CANDIDATES: usize = 8;
const MOST_CANDIDATES: usize = 128;
/// Timed runs per algorithm (the median counts), after one untimed run.
const RUNS: usize = 3;

/// `(m, n, k, ldc, float32 out, operand alignment)`.
type Shape = (usize, usize, usize, usize, bool, usize);

/// The largest power of two, up to 256, that divides every operand's address (the alignment the
/// algorithm may count on).
fn alignment(pointers: [CUdeviceptr; 3]) -> usize {
    pointers.iter().map(|&p| if p == 0 { 256 } else { 1usize << p.trailing_zeros().min(8) }).min().unwrap_or(256)
}

/// A cuBLASLt handle and the plans chosen with it.
pub struct TunedGemm {
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    /// Bytes written between timed runs to push the operands out of L2 (twice its size).
    flush_bytes: usize,
    /// Each shape's plan, and whether its algorithm was timed (else the heuristic's first).
    plans: HashMap<Shape, (Plan, bool)>,
    /// How many of the heuristic's algorithms are timed per shape.
    candidates: usize,
    /// Last: dropped after the plans made with it.
    handle: Handle,
}

impl TunedGemm {
    /// `$PAGEDSERVE_BLAS_TUNE`: `off` (the default), `on` (rows 2 to 64) or `A-B` (rows A to B,
    /// within 1 to the largest graph bucket, 256). `Ok(None)` when off.
    pub fn rows_from_env() -> Result<Option<RangeInclusive<usize>>, CudaError> {
        super::launch::parse_row_range("PAGEDSERVE_BLAS_TUNE", std::env::var("PAGEDSERVE_BLAS_TUNE").ok().as_deref(), 2..=64, *super::launch::GRAPH_BUCKETS.last().expect("buckets"))
            .map_err(CudaError::Config)
    }

    /// `$PAGEDSERVE_BLAS_TUNE_CANDIDATES`: how many of the heuristic's algorithms to time per
    /// shape (1 to `MOST_CANDIDATES`; `CANDIDATES` when unset). The heuristic may offer fewer.
    pub fn candidates_from_env() -> Result<usize, CudaError> {
        match std::env::var("PAGEDSERVE_BLAS_TUNE_CANDIDATES") {
            Err(_) => Ok(CANDIDATES),
            Ok(value) => value.parse().ok().filter(|n| (1..=MOST_CANDIDATES).contains(n)).ok_or_else(|| {
                CudaError::Config(format!("PAGEDSERVE_BLAS_TUNE_CANDIDATES is a count from 1 to {MOST_CANDIDATES}, not {value:?}"))
            }),
        }
    }

    /// A handle using `workspace_bytes` of device memory at `workspace` (which must outlive it;
    /// the cuBLAS workspace, shared: every user runs on the one stream), timing `candidates` of
    /// the heuristic's algorithms per shape.
    pub fn new(workspace: CUdeviceptr, workspace_bytes: usize, l2_bytes: usize, candidates: usize) -> Result<Self, CudaError> {
        Ok(TunedGemm { handle: Handle::new()?, workspace, workspace_bytes, flush_bytes: (2 * l2_bytes).max(8 << 20), plans: HashMap::new(), candidates })
    }

    /// Enqueues `out = x · wᵀ` with `algo`.
    ///
    /// # Safety
    /// As for `tuned_linear`.
    unsafe fn run(&self, dev: &GpuDevice, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t, out: CUdeviceptr, x: CUdeviceptr, w: CUdeviceptr) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        lt::matmul(
            self.handle.raw(),
            plan.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w as *const c_void,
            plan.a,
            x as *const c_void,
            plan.b,
            out as *const c_void,
            plan.d,
            out as *mut c_void,
            plan.d,
            algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            dev.stream.cu_stream() as _,
        )?;
        Ok(())
    }

    /// The fastest of `algos` for the product, by the median of `RUNS` timed runs each after an
    /// L2 flush; an algorithm that fails to launch is passed over. Returns its index.
    ///
    /// # Safety
    /// As for `tuned_linear`; the stream must not be capturing.
    unsafe fn fastest(&self, dev: &GpuDevice, plan: &Plan, algos: &[sys::cublasLtMatmulAlgo_t], out: CUdeviceptr, x: CUdeviceptr, w: CUdeviceptr) -> Result<(usize, Vec<f32>), CudaError> {
        let flush = dev.stream.alloc_zeros::<u8>(self.flush_bytes)?;
        let (flush_ptr, _) = cudarc::driver::DevicePtr::device_ptr(&flush, &dev.stream);
        let event = || dev.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let mut medians = Vec::with_capacity(algos.len());
        for algo in algos {
            if self.run(dev, plan, algo, out, x, w).is_err() {
                medians.push(f32::INFINITY);
                continue;
            }
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                cudarc::driver::result::memset_d8_async(flush_ptr, 1, self.flush_bytes, dev.stream.cu_stream())?;
                let (start, end) = (event()?, event()?);
                start.record(&dev.stream)?;
                self.run(dev, plan, algo, out, x, w)?;
                end.record(&dev.stream)?;
                times.push(start.elapsed_ms(&end)?);
            }
            times.sort_by(f32::total_cmp);
            medians.push(times[RUNS / 2]);
        }
        // The last run must leave `out` holding the product: run the winner once more.
        let best = (0..medians.len()).min_by(|&i, &j| medians[i].total_cmp(&medians[j])).unwrap_or(0);
        self.run(dev, plan, &algos[best], out, x, w)?;
        dev.stream.synchronize()?;
        Ok((best, medians))
    }
}

/// Whether `m` rows take the tuned path on `dev`: rows in the `PAGEDSERVE_BLAS_TUNE` range that
/// are a decode graph's batch size (`launch::GRAPH_BUCKETS`), the shapes a server replays over and
/// over. An eager step's rows (a prompt chunk's, any count) keep the heuristic's choice: timing
/// every count at first sight would stall those steps for tens of milliseconds each.
pub fn takes(dev: &GpuDevice, m: usize) -> bool {
    dev.tuned_gemm_rows().is_some_and(|rows| tunes(&rows, m))
}

/// `takes` for a given row range.
fn tunes(rows: &RangeInclusive<usize>, m: usize) -> bool {
    rows.contains(&m) && super::launch::GRAPH_BUCKETS.contains(&m)
}

/// `out[m×n] = x[m×k] · wᵀ` (rows of `out` `ldc` apart) through cuBLASLt with the algorithm
/// timed for the shape (`takes` said yes).
///
/// # Safety
/// `out`, `x` and `w` must be live device allocations of `m` rows of `ldc` (of `out_type`),
/// `m·k` and `n·k` bf16 values, on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tuned_linear(dev: &GpuDevice, out: CUdeviceptr, ldc: usize, out_type: OutType, x: CUdeviceptr, w: CUdeviceptr, m: usize, k: usize, n: usize) -> Result<(), CudaError> {
    let mut guard = dev.tuned_gemm().ok_or_else(|| CudaError::Config("the tuned cuBLASLt path is off on this device".into()))?;
    let tuned = &mut *guard;
    let align = alignment([out, x, w]);
    let shape = (m, n, k, ldc, out_type == OutType::F32, align);
    // A timed plan is the common case: only a missing or untimed one asks the driver whether the
    // stream is capturing (no timing then).
    let timed_plan = tuned.plans.get(&shape).is_some_and(|(_, timed)| *timed);
    let capturing = !timed_plan && dev.stream.capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    if !timed_plan && !(capturing && tuned.plans.contains_key(&shape)) {
        let out_dt = match out_type {
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        };
        let mut plan = Plan::new(sys::cudaDataType::CUDA_R_16BF, sys::cudaDataType::CUDA_R_16BF, out_dt, m, n, k, ldc)?;
        let algos = plan.candidates(tuned.handle.raw(), tuned.workspace_bytes, align, tuned.candidates).map_err(|e| CudaError::Config(format!("m {m} n {n} k {k}: {e}")))?;
        plan.algo = algos[0];
        let mut timed = false;
        if !capturing {
            match tuned.fastest(dev, &plan, &algos, out, x, w) {
                Ok((best, medians)) => {
                    tracing::info!(m, n, k, best, heuristic_us = medians[0] * 1e3, best_us = medians[best] * 1e3, candidates = algos.len(), "cuBLASLt algorithm timed");
                    plan.algo = algos[best];
                    timed = true;
                }
                // No room for the flush buffer, say: the heuristic's choice, for good.
                Err(error) => {
                    tracing::warn!(m, n, k, %error, "could not time cuBLASLt's algorithms; the heuristic's first is used");
                    timed = true;
                }
            }
        }
        tuned.plans.insert(shape, (plan, timed));
    }
    let (plan, _) = &tuned.plans[&shape];
    tuned.run(dev, plan, &plan.algo, out, x, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_graph_batch_sizes_within_the_range_are_tuned() {
        let rows = 2..=64;
        assert!(tunes(&rows, 32) && tunes(&rows, 48) && tunes(&rows, 64));
        // A prompt chunk's row count, and bucket sizes outside the range, keep the heuristic's.
        assert!(!tunes(&rows, 33) && !tunes(&rows, 1) && !tunes(&rows, 96));
        assert!(tunes(&(2..=256), 256) && !tunes(&(2..=256), 200));
    }

    #[test]
    fn alignment_is_the_least_aligned_operand_up_to_256() {
        assert_eq!(alignment([0x1000, 0x2000, 0x4000]), 256);
        assert_eq!(alignment([0x1000, 0x2010, 0x4000]), 16);
        assert_eq!(alignment([0x1002, 0x2000, 0x4000]), 2);
        assert_eq!(alignment([0x1080, 0x2000, 0x4000]), 128);
    }
}
