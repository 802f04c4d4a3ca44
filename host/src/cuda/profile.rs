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

/// Every this many serving steps, `ServingStepTimer` times one on the device.
const TIME_EVERY: u64 = 16;

/// Where a serving step's time goes on the device, sampled every `TIME_EVERY`th step so that the
/// events cost the other steps nothing: the forward, the wait between the forward and the sampling
/// kernel (the host finishing masks and packing, and the upload), and the sampling kernel. The
/// engine publishes the results as step phases (`device_*` in `engine_step_phase_seconds`).
pub struct ServingStepTimer {
    /// forward start, forward end, sampling start (after the upload), sampling end.
    events: Option<[CudaEvent; 4]>,
    steps: u64,
    /// Whether the step being launched records the events.
    timing: bool,
    /// The step whose times the events hold, not yet read (`phases` reads them once, for that
    /// step: with async scheduling the next step is launched before they are read).
    recorded: Option<u64>,
    /// Which of the events that step recorded (one with nothing to sample records no sampling
    /// marks, and an event never recorded cannot be timed).
    marked: std::cell::Cell<[bool; 4]>,
}

/// The timer's marks, in step order.
#[derive(Debug, Clone, Copy)]
pub enum StepMark {
    ForwardStart = 0,
    ForwardEnd = 1,
    SampleStart = 2,
    SampleEnd = 3,
}

impl Default for ServingStepTimer {
    fn default() -> Self {
        ServingStepTimer { events: None, steps: 0, timing: false, recorded: None, marked: Default::default() }
    }
}

impl ServingStepTimer {
    /// Starts a step: decides whether it is timed (and records its first mark if so). Returns
    /// the step's number, for `phases`.
    pub fn begin(&mut self, dev: &GpuDevice) -> Result<u64, CudaError> {
        self.steps += 1;
        self.timing = self.steps % TIME_EVERY == 1;
        // Times of a step that was never collected (its launch failed) are dropped.
        if self.recorded.is_some_and(|r| r + 2 < self.steps) {
            self.recorded = None;
        }
        // A timed step's events are not recorded over before they are read.
        self.timing = self.timing && self.recorded.is_none();
        if self.timing && self.events.is_none() {
            let new = || dev.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
            self.events = Some([new()?, new()?, new()?, new()?]);
        }
        if self.timing {
            self.recorded = Some(self.steps);
            self.marked.set([false; 4]);
        }
        self.mark(dev, StepMark::ForwardStart)?;
        Ok(self.steps)
    }

    /// Records `mark` on the stream if this step is timed.
    pub fn mark(&self, dev: &GpuDevice, mark: StepMark) -> Result<(), CudaError> {
        match (&self.events, self.timing) {
            (Some(events), true) => {
                events[mark as usize].record(&dev.stream)?;
                let mut marked = self.marked.get();
                marked[mark as usize] = true;
                self.marked.set(marked);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A timed step's device phases, once its last mark has completed (the caller has waited for
    /// the step's results); empty for an untimed step.
    pub fn phases(&mut self, step: u64) -> Result<Vec<(&'static str, std::time::Duration)>, CudaError> {
        if self.recorded != Some(step) {
            return Ok(Vec::new());
        }
        self.recorded = None;
        let Some(e) = &self.events else { return Ok(Vec::new()) };
        let span = |a: &CudaEvent, b: &CudaEvent| -> Result<std::time::Duration, CudaError> {
            Ok(std::time::Duration::from_secs_f64(f64::from(a.elapsed_ms(b)?.max(0.0)) / 1e3))
        };
        let marked = self.marked.get();
        let mut phases = Vec::new();
        for (name, from, to) in [("device_forward", 0, 1), ("device_sample_wait", 1, 2), ("device_sample", 2, 3)] {
            if marked[from] && marked[to] {
                phases.push((name, span(&e[from], &e[to])?));
            }
        }
        Ok(phases)
    }
}
