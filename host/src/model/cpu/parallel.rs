//! Tensor parallelism on the CPU: `world` ranks as threads of one process, each running the
//! float32 forward over its own shard (`model::parallel`) and its own KV cache (its key/value
//! heads' slice of every block), all from the same `ForwardBatch` and block tables. It is the
//! reference a device's tensor parallelism is judged against, and it checks the shard plan: the
//! ranks together must give the logits of the whole model.
//!
//! The ranks meet in a `ThreadGroup`: for each collective every rank publishes its buffer in its
//! slot and waits for the others (`Rendezvous`), then reads what it needs; a second wait keeps
//! the slots until everyone has read them. Sums are taken in rank order, so every rank gets the
//! same bits. A rank that fails (an error or a panic) aborts the group, so the others return an
//! error instead of waiting for it forever.

use std::sync::{Condvar, Mutex, MutexGuard};

use super::kv_storage::CpuKvCache;
use super::CpuModel;
use crate::kv_cache::KvCacheDtype;
use crate::model::parallel::TensorParallel;
use crate::model::weights::WeightSource;
use crate::model::{ModelConfig, ModelError};
use crate::runner::ForwardBatch;

/// The whole model as `world` ranks, one `CpuModel` shard each.
pub struct CpuTensorParallelModel {
    /// The whole model's configuration.
    config: ModelConfig,
    ranks: Vec<CpuModel>,
}

impl CpuTensorParallelModel {
    /// Every rank's shard of `config`'s weights from `source`, or why the model cannot be split
    /// `world` ways.
    pub fn load(config: ModelConfig, source: &dyn WeightSource, world: usize) -> Result<Self, ModelError> {
        let ranks = TensorParallel::ranks(world)?
            .into_iter()
            .map(|parallel| CpuModel::load_shard(config.clone(), source, None, parallel))
            .collect::<Result<_, _>>()?;
        Ok(CpuTensorParallelModel { config, ranks })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Each rank's model (its local configuration and its shard of the weights).
    pub fn ranks(&self) -> &[CpuModel] {
        &self.ranks
    }

    /// One cache per rank, for its own key/value heads, all with the same blocks.
    pub fn kv_caches(&self, num_blocks: usize, block_size: usize, dtype: KvCacheDtype) -> Vec<CpuKvCache> {
        self.ranks.iter().map(|rank| CpuKvCache::with_dtype(rank.kv_layout(num_blocks, block_size), dtype)).collect()
    }

    /// Runs `batch` on every rank (`caches` from `kv_caches`, one per rank) and returns the whole
    /// vocabulary's logits `[batch.logits_rows.len(), vocab_size]`.
    pub fn forward(&self, batch: &ForwardBatch, caches: &mut [CpuKvCache]) -> Result<Vec<f32>, ModelError> {
        self.forward_in(&ThreadGroup::new(self.world()), batch, caches)
    }

    /// `forward`, the ranks meeting in `group` (a fresh one: a failed forward leaves it aborted).
    fn forward_in(&self, group: &ThreadGroup, batch: &ForwardBatch, caches: &mut [CpuKvCache]) -> Result<Vec<f32>, ModelError> {
        if caches.len() != self.world() || group.world != self.world() {
            return Err(ModelError::Input(format!(
                "{} KV caches and a group of {} for {} tensor-parallel ranks",
                caches.len(),
                group.world,
                self.world()
            )));
        }
        let mut results: Vec<Result<Vec<f32>, ModelError>> = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .ranks
                .iter()
                .zip(caches.iter_mut())
                .enumerate()
                .map(|(rank, (model, cache))| scope.spawn(move || group.run(rank, || model.forward_rank(batch, cache, group.communicator(rank)))))
                .collect();
            // Every thread is joined before a panic goes on: the group's abort let the others end.
            let joined: Vec<_> = threads.into_iter().map(|thread| thread.join()).collect();
            joined.into_iter().map(|result| result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        // The rank that failed first holds the cause; the others only saw the abort.
        let rank = group.failed_rank().unwrap_or(0);
        results.swap_remove(rank)
    }
}

/// The ranks of one forward: their published buffers and where they wait for each other.
pub struct ThreadGroup {
    world: usize,
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Mutex<Vec<f32>>>,
    rendezvous: Rendezvous,
    /// The first rank to fail, which aborted the group.
    failed: Mutex<Option<usize>>,
    /// Every all-reduce leaves each rank's own values: a wrong forward, which the tests must
    /// catch (`skipping_all_reduce`).
    skip_all_reduce: bool,
}

impl ThreadGroup {
    pub fn new(world: usize) -> Self {
        ThreadGroup {
            world,
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            rendezvous: Rendezvous::default(),
            failed: Mutex::new(None),
            skip_all_reduce: false,
        }
    }

    #[cfg(test)]
    fn skipping_all_reduce(mut self) -> Self {
        self.skip_all_reduce = true;
        self
    }

    /// Rank `rank`'s end of the group.
    pub fn communicator(&self, rank: usize) -> Communicator<'_> {
        assert!(rank < self.world, "rank {rank} of a world of {}", self.world);
        Communicator { group: self, rank }
    }

    /// Runs rank `rank`'s work; if it fails or panics, the group is aborted, so that no other
    /// rank waits for it.
    fn run<T>(&self, rank: usize, work: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
        /// Aborts the group when dropped unless `done`: on an error, or while a panic unwinds.
        struct AbortUnlessDone<'a> {
            group: &'a ThreadGroup,
            rank: usize,
            done: bool,
        }
        impl Drop for AbortUnlessDone<'_> {
            fn drop(&mut self) {
                if !self.done {
                    self.group.abort(self.rank);
                }
            }
        }
        let mut guard = AbortUnlessDone { group: self, rank, done: false };
        let result = work();
        guard.done = result.is_ok();
        result
    }

    fn abort(&self, rank: usize) {
        lock(&self.failed).get_or_insert(rank);
        self.rendezvous.abort();
    }

    fn failed_rank(&self) -> Option<usize> {
        *lock(&self.failed)
    }
}

/// A poisoned lock only means another rank panicked; its abort already tells the others.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank's collectives over its `ThreadGroup`.
#[derive(Clone, Copy)]
pub struct Communicator<'a> {
    group: &'a ThreadGroup,
    rank: usize,
}

impl Communicator<'_> {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.group.world
    }

    /// In place: `values` summed over the ranks, in rank order (the same bits on every rank).
    pub fn all_reduce(&self, values: &mut [f32]) -> Result<(), ModelError> {
        self.publish(values)?;
        if !self.group.skip_all_reduce {
            for (rank, slot) in self.group.slots.iter().enumerate() {
                let slot = lock(slot);
                if slot.len() != values.len() {
                    return Err(ModelError::Backend(format!("all-reduce of {} values; rank {rank} has {}", values.len(), slot.len())));
                }
                // Rank 0's values as they are (not added to zeros, which would turn -0 into +0).
                if rank == 0 {
                    values.copy_from_slice(&slot);
                } else {
                    values.iter_mut().zip(slot.iter()).for_each(|(sum, v)| *sum += v);
                }
            }
        }
        self.group.rendezvous.wait(self.group.world)
    }

    /// Every rank's `values`, in rank order.
    pub fn all_gather(&self, values: &[f32]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.publish(values)?;
        let gathered = self.group.slots.iter().map(|slot| lock(slot).clone()).collect();
        self.group.rendezvous.wait(self.group.world)?;
        Ok(gathered)
    }

    /// Puts `values` in this rank's slot and waits until every rank has put its own.
    fn publish(&self, values: &[f32]) -> Result<(), ModelError> {
        {
            let mut slot = lock(&self.group.slots[self.rank]);
            slot.clear();
            slot.extend_from_slice(values);
        }
        self.group.rendezvous.wait(self.group.world)
    }
}

/// A reusable barrier that can be aborted: `wait` returns once all `world` ranks have called it,
/// or with an error as soon as one rank has failed.
#[derive(Default)]
struct Rendezvous {
    state: Mutex<RendezvousState>,
    changed: Condvar,
}

#[derive(Default)]
struct RendezvousState {
    arrived: usize,
    /// Counts completed rendezvous, so a rank woken late knows its own has passed.
    generation: u64,
    aborted: bool,
}

impl Rendezvous {
    fn wait(&self, world: usize) -> Result<(), ModelError> {
        let mut state = lock(&self.state);
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == world && !state.aborted {
            state.arrived = 0;
            state.generation += 1;
            self.changed.notify_all();
            return Ok(());
        }
        while state.generation == generation && !state.aborted {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.generation == generation {
            return Err(ModelError::Backend("another tensor-parallel rank failed".into()));
        }
        Ok(())
    }

    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
#[path = "parallel_tests.rs"]
mod tests;
