//! Tensor parallelism's collectives on the GPU (issue 14): one NCCL communicator per rank, all made
//! in this process over the ranks' devices (`ncclCommInitAll`), and the two operations the forward
//! needs: an in-place sum across the ranks of an activation (`Ops::all_reduce`) and an all-gather
//! of the logits (`Ops::all_gather_logits`). They are enqueued on the rank's stream like any
//! kernel, so a forward with collectives is captured in a CUDA graph like any other.
//!
//! NCCL is loaded at run time like the rest of CUDA (cudarc's dynamic loading): a binary built
//! without it runs everywhere, and only `--tensor-parallel-size` above 1 on CUDA needs it.
//! NVLink multicast stays off: `main` sets `NCCL_NVLS_ENABLE=0` when the environment does not say,
//! and nothing here calls `cuMulticastCreate`.
//!
//! A rank that fails between collectives would leave the others waiting inside one for ever, so a
//! failure aborts the whole group (`RankComm::abort`): the group refuses every later collective,
//! and `ncclCommAbort` on every communicator releases the kernels waiting in one. NCCL's abort of
//! a group's last communicator waits until every CUDA graph that captured one of its collectives
//! is destroyed, so it runs on a thread of its own, and the backend drops its graphs
//! (`cuda::parallel`). An error NCCL meets asynchronously (a transport failure), which no call
//! returns, is found by a watchdog thread that polls every communicator and aborts the group.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::nccl::{result, sys};

use super::{CudaError, GpuDevice};

/// The element type of a collective's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            Elem::F32 => sys::ncclDataType_t::ncclFloat32,
            Elem::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// Whether the NCCL library can be loaded (it is looked up as `libnccl.so`, then by CUDA's
/// versioned names).
pub fn is_available() -> bool {
    // SAFETY: only tries to open the library; no NCCL call is made.
    unsafe { sys::is_culib_present() }
}

/// NCCL's version as `major.minor.patch`.
pub fn version() -> Result<String, CudaError> {
    let code = result::get_nccl_version().map_err(nccl_error)?;
    Ok(format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100))
}

fn nccl_error(e: result::NcclError) -> CudaError {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    CudaError::Nccl(text.to_string_lossy().into_owned())
}

/// Every rank's communicator of one group, and whether the group was aborted.
struct Group {
    comms: Vec<sys::ncclComm_t>,
    aborted: AtomicBool,
    /// Read-held while a collective is enqueued, write-held to abort: a communicator is never
    /// freed while a rank's thread is inside a call on it.
    in_use: RwLock<()>,
}

// SAFETY: an NCCL communicator may be used from any thread; each rank's is used by one thread at a
// time (its rank's), and `abort` frees them only under `in_use`'s write lock, once no rank is
// inside a call.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::Acquire) {
            return;
        }
        for &comm in &self.comms {
            // SAFETY: every rank's handle is gone (they hold the group), so nothing uses it.
            if let Err(e) = unsafe { result::comm_destroy(comm) } {
                tracing::warn!(error = %nccl_error(e), "destroying an NCCL communicator");
            }
        }
    }
}

/// One rank's end of a group: what its forward's collectives go through.
pub struct RankComm {
    group: Arc<Group>,
    rank: usize,
}

impl std::fmt::Debug for RankComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RankComm({} of {})", self.rank, self.world())
    }
}

impl RankComm {
    /// A group over `devices` (rank `r` on `devices[r]`), from this one process, checked with one
    /// all-reduce across it before it is returned: a group that cannot talk fails here, at start-up,
    /// not inside a forward. A group of one device is allowed: its collectives copy, which is how
    /// one GPU runs the path.
    pub fn group(devices: &[Arc<GpuDevice>]) -> Result<Vec<RankComm>, CudaError> {
        if devices.is_empty() {
            return Err(CudaError::Config("an NCCL group of no devices".into()));
        }
        if !is_available() {
            return Err(CudaError::Unavailable(
                "NCCL (libnccl.so) was not found: tensor parallelism on CUDA needs it on the library path".into(),
            ));
        }
        let list: Vec<i32> = devices.iter().map(|dev| dev.context.ordinal() as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device of `list`.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), list.len() as i32, list.as_ptr()) }.map_err(nccl_error)?;
        let group = Arc::new(Group { comms, aborted: AtomicBool::new(false), in_use: RwLock::new(()) });
        let ranks: Vec<RankComm> = (0..devices.len()).map(|rank| RankComm { group: group.clone(), rank }).collect();
        Self::check_sum(&ranks, devices)?;
        Ok(ranks)
    }

    /// Every rank all-reduces its rank number plus one; each must get `world * (world + 1) / 2`.
    /// One thread drives every rank here, so the calls go in one NCCL group call.
    fn check_sum(ranks: &[RankComm], devices: &[Arc<GpuDevice>]) -> Result<(), CudaError> {
        let buffers = ranks
            .iter()
            .zip(devices)
            .map(|(comm, dev)| Ok(dev.stream.clone_htod(&[comm.rank as f32 + 1.0])?))
            .collect::<Result<Vec<_>, CudaError>>()?;
        result::group_start().map_err(nccl_error)?;
        let enqueued = ranks.iter().zip(devices).zip(&buffers).try_for_each(|((comm, dev), buffer)| {
            // SAFETY: one float on the rank's device, kept until the streams are synchronized.
            unsafe { comm.all_reduce_sum(super::model::ptr(dev, buffer), 1, Elem::F32, dev.stream.cu_stream()) }
        });
        result::group_end().map_err(nccl_error)?;
        enqueued?;
        let world = ranks.len() as f32;
        for (dev, buffer) in devices.iter().zip(&buffers) {
            let got = dev.stream.clone_dtoh(buffer)?[0];
            if got != world * (world + 1.0) / 2.0 {
                return Err(CudaError::Nccl(format!("the group's first all-reduce gave {got} on {}, not {}", dev.name, world * (world + 1.0) / 2.0)));
            }
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.group.comms.len()
    }

    /// `call` with this rank's communicator, unless the group was aborted; the communicator
    /// cannot be freed while it runs.
    fn with_comm(&self, call: impl FnOnce(sys::ncclComm_t) -> Result<result::NcclStatus, result::NcclError>) -> Result<(), CudaError> {
        let _in_use = self.group.in_use.read().unwrap_or_else(|p| p.into_inner());
        if self.group.aborted.load(Ordering::Acquire) {
            return Err(CudaError::Nccl("the tensor-parallel group was aborted after a rank failed".into()));
        }
        call(self.group.comms[self.rank]).map_err(nccl_error)?;
        Ok(())
    }

    /// Enqueues on `stream` the sum across the ranks of `count` elements at `buffer`, in place.
    ///
    /// # Safety
    /// `buffer` holds `count` elements of `elem` on this rank's device, live until the stream
    /// reaches the operation; every rank enqueues the same collectives in the same order.
    pub unsafe fn all_reduce_sum(&self, buffer: CUdeviceptr, count: usize, elem: Elem, stream: CUstream) -> Result<(), CudaError> {
        let ptr = buffer as *mut std::ffi::c_void;
        self.with_comm(|comm| result::all_reduce(ptr, ptr, count, elem.nccl(), sys::ncclRedOp_t::ncclSum, comm, stream as sys::cudaStream_t))
    }

    /// Enqueues on `stream` the gather of every rank's `count` elements at `send` into `recv`,
    /// rank after rank (`world * count` elements).
    ///
    /// # Safety
    /// As `all_reduce_sum`, with `recv` holding `world * count` elements.
    pub unsafe fn all_gather(&self, send: CUdeviceptr, recv: CUdeviceptr, count: usize, elem: Elem, stream: CUstream) -> Result<(), CudaError> {
        self.with_comm(|comm| result::all_gather(send as *const std::ffi::c_void, recv as *mut std::ffi::c_void, count, elem.nccl(), comm, stream as sys::cudaStream_t))
    }

    /// Aborts the group (once) without waiting: it refuses every later collective at once, and a
    /// thread of its own aborts every communicator, which releases the kernels waiting in a
    /// collective for a rank that failed. That thread ends once every graph holding one of the
    /// group's collectives is destroyed (NCCL waits for them), which the backend sees to.
    pub fn abort(&self) {
        if self.group.aborted.swap(true, Ordering::AcqRel) {
            return;
        }
        let group = self.group.clone();
        let spawned = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
            let _alone = group.in_use.write().unwrap_or_else(|p| p.into_inner());
            for &comm in &group.comms {
                // SAFETY: no rank is inside a call on it (the write lock), and none makes one after
                // (the flag); NCCL allows aborting a communicator whose kernels are waiting.
                if let Err(e) = unsafe { result::comm_abort(comm) } {
                    tracing::warn!(error = %nccl_error(e), "aborting an NCCL communicator");
                }
            }
            tracing::info!("NCCL group aborted");
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the thread that aborts the NCCL group; ranks waiting in a collective stay there");
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.group.aborted.load(Ordering::Acquire)
    }

    /// Starts the group's watchdog (see `Watchdog`).
    pub fn watchdog(&self) -> Result<Watchdog, CudaError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (comm, stopped) = (RankComm { group: self.group.clone(), rank: self.rank }, stop.clone());
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) && !comm.is_aborted() {
                    std::thread::sleep(WATCHDOG_PERIOD);
                    if let Some((rank, error)) = comm.async_error() {
                        tracing::error!(rank, error = %nccl_error(result::NcclError(error)), "NCCL reported an asynchronous error; aborting the tensor-parallel group");
                        comm.abort();
                    }
                }
            })
            .map_err(|e| CudaError::Config(format!("starting the NCCL watchdog: {e}")))?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }

    /// The first rank whose communicator holds an asynchronous error, and the error.
    fn async_error(&self) -> Option<(usize, sys::ncclResult_t)> {
        let _in_use = self.group.in_use.read().unwrap_or_else(|p| p.into_inner());
        if self.is_aborted() {
            return None;
        }
        self.group.comms.iter().enumerate().find_map(|(rank, &comm)| {
            let mut error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is live (not aborted, and `in_use` keeps an abort out).
            unsafe { sys::ncclCommGetAsyncError(comm, &mut error) };
            match error {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => None,
                error => Some((rank, error)),
            }
        })
    }
}

/// How often the watchdog asks NCCL for asynchronous errors.
const WATCHDOG_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// A thread that asks NCCL every `WATCHDOG_PERIOD` whether any communicator of the group met an
/// asynchronous error (a transport failure, a peer gone), which no call returns and which would
/// leave the ranks waiting in a collective for ever, and aborts the group when one did: the
/// ranks then fail their step. It stops when dropped, or once the group is aborted.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
