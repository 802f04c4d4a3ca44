//! Tensor parallelism served on CUDA (`--tensor-parallel-size N`, issue 14): N GPUs of one host,
//! one rank each, in one process, meeting in NCCL (`cuda::collective`).
//!
//! Rank 0 runs on the engine's thread, inside this backend; every other rank has a worker thread
//! that owns its `GpuBackend` (its shard, its KV cache, its decode graphs). A step sends the batch
//! to the workers, runs rank 0's forward and sampling here, and waits for the workers. The ranks
//! exchange activations only through the collectives the forward enqueues on each GPU, so nothing
//! else crosses between threads. As on the CPU (`runner::cpu_parallel`), ONE scheduler and ONE
//! KV-cache manager serve every rank: a block id is the same block on every rank, each holding its
//! key/value heads' slice of it, and copy-on-write copies it on every rank. After the gather of
//! the logits rank 0 holds the whole vocabulary's, and samples as one GPU does (constraints and
//! plugins included).
//!
//! A batch the forward cannot take is refused before any rank sees it. Any other failure on any
//! rank (an error, a panic, a thread gone) aborts the NCCL group, so no rank waits for ever in a
//! collective; the group is then retired (every rank's graphs dropped, which NCCL's abort waits
//! for, and the workers ended), and the backend refuses every later step with the first
//! failure's message. Every rank captures its graphs once, with no retry of its own, so the
//! ranks' collectives stay in step.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::collective::RankComm;
use super::model::check_batch;
use super::{CudaError, GpuBackend, GpuModel};
use crate::kv_cache::{BlockId, KvCacheDtype, KvCacheLayout};
use crate::model::{ModelConfig, ModelError};
use crate::runner::{ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, SampledRow};

/// What a worker rank is asked to do, in the order the engine does it.
enum Job {
    Forward(ForwardBatch),
    CopyBlocks(Vec<(BlockId, BlockId)>),
    PrepareForServing { max_num_seqs: usize, max_model_len: usize },
}

/// A rank other than 0: its thread, and the channels to it. Jobs that answer (`Forward`,
/// `PrepareForServing`) answer in order on `answers`.
struct Worker {
    rank: usize,
    jobs: Option<mpsc::Sender<Job>>,
    answers: mpsc::Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

pub struct GpuTensorParallelBackend {
    /// The whole model's configuration (vocabulary, heads, sizes).
    config: ModelConfig,
    rank0: GpuBackend,
    workers: Vec<Worker>,
    /// Rank 0's end of the group, to abort it when a step fails.
    comm: Arc<RankComm>,
    /// The whole model's layout over the shared blocks: what the engine's block accounting reads
    /// (a rank's own cache holds only its key/value heads).
    layout: KvCacheLayout,
    /// The first failure, after which every step is refused.
    failed: Option<String>,
    /// Aborts the group on an NCCL error no call returns (`collective::Watchdog`).
    _watchdog: super::collective::Watchdog,
}

impl GpuTensorParallelBackend {
    /// A backend over `ranks` (rank `r`'s shard at `ranks[r]`, each on its own GPU and joined to
    /// one NCCL group), every rank's cache `num_blocks` blocks of `block_size` tokens of `dtype`.
    pub fn new(config: ModelConfig, ranks: Vec<GpuModel>, num_blocks: usize, block_size: usize, dtype: KvCacheDtype) -> Result<Self, CudaError> {
        let world = ranks.len();
        for (rank, model) in ranks.iter().enumerate() {
            let comm = model.collective().ok_or_else(|| CudaError::Config(format!("rank {rank} of {world} has no NCCL communicator")))?;
            if (comm.rank(), comm.world()) != (rank, world) {
                return Err(CudaError::Config(format!("rank {rank} of {world} holds NCCL rank {} of {}", comm.rank(), comm.world())));
            }
        }
        let mut ranks = ranks.into_iter();
        let rank0 = ranks.next().ok_or_else(|| CudaError::Config("tensor parallelism over no GPU".into()))?;
        let comm = rank0.collective().expect("checked above").clone();
        let rank0 = GpuBackend::with_kv_cache(rank0, num_blocks, block_size, dtype)?;
        let mut workers = Vec::with_capacity(world - 1);
        for (i, model) in ranks.enumerate() {
            let rank = i + 1;
            let backend = GpuBackend::with_kv_cache(model, num_blocks, block_size, dtype)?;
            let (jobs, inbox) = mpsc::channel();
            let (outbox, answers) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("gpu-rank-{rank}"))
                .spawn(move || serve_rank(backend, inbox, outbox))
                .map_err(|e| CudaError::Config(format!("starting the thread of rank {rank}: {e}")))?;
            workers.push(Worker { rank, jobs: Some(jobs), answers, thread: Some(thread) });
        }
        let layout = KvCacheLayout::for_model(&config, num_blocks, block_size);
        let _watchdog = comm.watchdog()?;
        Ok(GpuTensorParallelBackend { config, rank0, workers, comm, layout, failed: None, _watchdog })
    }

    pub fn world(&self) -> usize {
        self.workers.len() + 1
    }

    /// Captures every rank's decode graphs (all at once: a capture's warm-up runs the
    /// collectives, which need every rank), as `GpuBackend::prepare_for_serving` does for one but
    /// with no retry: a rank that fails its capture fails the group.
    pub fn prepare_for_serving(&mut self, graphs: bool, max_num_seqs: usize, max_model_len: usize) -> Result<usize, CudaError> {
        if !graphs {
            tracing::info!("CUDA graphs off: every rank's decode steps launch kernel by kernel");
            return Ok(0);
        }
        let captured = self.step(|| Job::PrepareForServing { max_num_seqs, max_model_len }, |rank0| rank0.capture_serving_graphs(max_num_seqs, max_model_len));
        captured.map_err(|e| CudaError::Config(e.to_string()))
    }

    /// Sends `job()` to every worker, runs `rank0` here, then collects every worker's answer. The
    /// first failure (rank 0's first) aborts and retires the group and is kept: later steps are
    /// refused.
    fn step<T>(&mut self, job: impl Fn() -> Job, rank0: impl FnOnce(&mut GpuBackend) -> Result<T, CudaError>) -> Result<T, ModelError> {
        if let Some(failed) = &self.failed {
            return Err(ModelError::Backend(format!("CUDA tensor parallelism failed earlier: {failed}")));
        }
        // A worker whose thread ended takes no job.
        let sent: Vec<bool> = self.workers.iter().map(|w| w.jobs.as_ref().is_some_and(|jobs| jobs.send(job()).is_ok())).collect();
        if let Some(gone) = self.workers.iter().zip(&sent).find(|(_, &sent)| !sent) {
            // Rank 0's collectives would wait for it for ever: do not start them.
            let failure = format!("rank {}: its thread ended", gone.0.rank);
            let answered: Vec<bool> = sent.iter().map(|&s| !s).collect();
            return Err(self.retire(failure, &answered));
        }
        let result = rank0(&mut self.rank0);
        if result.is_err() {
            // The workers may be waiting in a collective rank 0 never reached.
            self.comm.abort();
        }
        let mut failure = result.as_ref().err().map(|e| format!("rank 0: {e}"));
        for worker in &self.workers {
            if let Err(e) = worker.answers.recv().unwrap_or_else(|_| Err("its thread ended".into())) {
                self.comm.abort();
                failure.get_or_insert_with(|| format!("rank {}: {e}", worker.rank));
            }
        }
        if failure.is_none() && self.comm.is_aborted() {
            // The watchdog aborted the group during the step: the collectives may have returned
            // without their data, so no rank's result can be trusted.
            failure = Some("the NCCL group was aborted during the step (an asynchronous NCCL error)".into());
        }
        match failure {
            None => Ok(result.expect("no failure")),
            Some(failure) => Err(self.retire(failure, &vec![true; self.workers.len()])),
        }
    }

    /// Ends the group after `failure`: aborts it (if no rank did), drops rank 0's graphs and ends
    /// every worker (their backends and graphs go with them), which lets NCCL's abort finish.
    /// `answered[i]`: worker i owes no answer.
    fn retire(&mut self, failure: String, answered: &[bool]) -> ModelError {
        tracing::error!(%failure, "a tensor-parallel rank failed; the NCCL group is aborted and the backend refuses further steps");
        self.comm.abort();
        self.rank0.graphs = None;
        for (worker, &answered) in self.workers.iter().zip(answered) {
            if !answered {
                let _ = worker.answers.recv();
            }
        }
        self.end_workers();
        self.failed = Some(failure.clone());
        ModelError::Backend(format!("CUDA tensor parallelism: {failure}"))
    }

    /// Closes every worker's channel, which ends its loop, and waits for its thread.
    fn end_workers(&mut self) {
        for worker in &mut self.workers {
            worker.jobs.take();
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    tracing::error!(rank = worker.rank, "a tensor-parallel rank's thread panicked");
                }
            }
        }
    }
}

/// Aborts the group if the worker's thread panics, so no other rank waits for it in a collective.
struct AbortOnPanic(Arc<RankComm>);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// A worker rank's loop: run each job on its backend, answer the ones that answer. A failed job
/// aborts the group at once, so rank 0 (and the other workers) stop waiting for this rank, and
/// drops the rank's graphs, which NCCL's abort waits for.
fn serve_rank(mut backend: GpuBackend, jobs: mpsc::Receiver<Job>, answers: mpsc::Sender<Result<(), String>>) {
    let comm = backend.model().collective().expect("a rank of a group").clone();
    let _guard = AbortOnPanic(comm.clone());
    for job in jobs {
        let answer = match job {
            Job::CopyBlocks(copies) => {
                backend.copy_blocks(&copies);
                continue;
            }
            Job::Forward(batch) => backend.forward_on_device(&batch).and_then(|_| Ok(backend.model().device().stream.synchronize()?)).map(drop),
            Job::PrepareForServing { max_num_seqs, max_model_len } => backend.capture_serving_graphs(max_num_seqs, max_model_len).map(drop),
        };
        if answer.is_err() {
            comm.abort();
            backend.graphs = None;
        }
        if answers.send(answer.map_err(|e| e.to_string())).is_err() {
            return;
        }
    }
}

impl Drop for GpuTensorParallelBackend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Rank 0 may have stopped in the middle of a step, the workers inside a collective.
            self.comm.abort();
            self.rank0.graphs = None;
        }
        self.end_workers();
    }
}

impl ModelBackend for GpuTensorParallelBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) {
        self.rank0.copy_blocks(copies);
        for worker in &self.workers {
            if let Some(jobs) = &worker.jobs {
                // A worker that is gone fails the next step, which reports it.
                let _ = jobs.send(Job::CopyBlocks(copies.to_vec()));
            }
        }
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        check_batch(&self.config, batch).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))?;
        self.step(|| Job::Forward(batch.clone()), |rank0| rank0.forward_logits_via_graphs(batch))
    }

    fn forward_sampled(&mut self, batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        check_batch(&self.config, batch).map_err(|e| ModelError::Input(format!("CUDA forward: {e}")))?;
        self.step(|| Job::Forward(batch.clone()), |rank0| rank0.forward_and_sample(batch, rows))
    }

    fn step_phases(&self) -> &[(&'static str, std::time::Duration)] {
        self.rank0.step_phases()
    }
}
