//! Where a forward step's time goes, by kind of launch (`bench gpu`'s breakdown). With a
//! `StepProfiler` installed on the backend, the forward (`cuda::forward`) records a CUDA event before each launch
//! group (`mark`), and the time from one mark to the next is charged to the first one's kind.
//!
//! The events time the device, not the host, only if the host enqueues the step faster than the
//! GPU runs it: the caller puts long device work (a large copy) in front of the step, so the
//! launches queue up and then run back to back, as in a graph replay. The events themselves add
//! a little to each interval (about a microsecond per mark).

use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::CudaEvent;

use super::{CudaError, GpuDevice};

#[derive(Default)]
pub struct StepProfiler {
    marks: Vec<(&'static str, CudaEvent)>,
    /// Device-to-device copies enqueued before the first mark (`src`, `dst`, bytes, times): the
    /// device work the step queues up behind (see the module docs). They go in at the first mark,
    /// after the batch's upload, so no host-side wait on the stream can sit between them and the
    /// step's launches.
    head_start: Option<(CUdeviceptr, CUdeviceptr, usize, usize)>,
}

/// One kind's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct KindTime {
    pub kind: &'static str,
    /// Launch groups of this kind in the step.
    pub count: usize,
    /// Milliseconds of the step spent in them.
    pub ms: f64,
}

impl StepProfiler {
    /// A profiler whose first mark enqueues `copies` copies of `bytes` from `src` to `dst`.
    ///
    /// # Safety
    /// `src` and `dst` must be distinct live device allocations of at least `bytes` each, on the
    /// stream of the device the marks are recorded on, until `finish`.
    pub unsafe fn with_head_start(src: CUdeviceptr, dst: CUdeviceptr, bytes: usize, copies: usize) -> Self {
        StepProfiler { marks: Vec::new(), head_start: Some((src, dst, bytes, copies)) }
    }

    /// Records an event on the stream: the work enqueued from here to the next mark is `kind`'s.
    pub fn mark(&mut self, dev: &GpuDevice, kind: &'static str) -> Result<(), CudaError> {
        if let Some((src, dst, bytes, copies)) = self.head_start.take() {
            for _ in 0..copies {
                // SAFETY: see `with_head_start`.
                unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, dev.stream.cu_stream())? };
            }
        }
        let event = dev.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        event.record(&dev.stream)?;
        self.marks.push((kind, event));
        Ok(())
    }

    /// Waits for the last mark and sums the intervals by kind, in order of first appearance.
    /// The last mark only closes the previous interval (name it `"end"`).
    pub fn finish(self) -> Result<Vec<KindTime>, CudaError> {
        let Some((_, last)) = self.marks.last() else { return Ok(Vec::new()) };
        last.synchronize()?;
        let mut kinds: Vec<KindTime> = Vec::new();
        for pair in self.marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1)? as f64;
            match kinds.iter_mut().find(|k| k.kind == pair[0].0) {
                Some(k) => {
                    k.count += 1;
                    k.ms += ms;
                }
                None => kinds.push(KindTime { kind: pair[0].0, count: 1, ms }),
            }
        }
        Ok(kinds)
    }
}
