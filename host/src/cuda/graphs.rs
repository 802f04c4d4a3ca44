//! CUDA graphs for decode steps: the whole forward of a batch where every sequence computes one
//! token, captured once per batch-size bucket (`launch::GRAPH_BUCKETS`) and replayed with one
//! launch instead of hundreds, so small batches stop paying per-kernel launch costs.
//!
//! A graph replays fixed pointers and grid sizes, so everything it touches is static: its own
//! scratch buffers, one index buffer laid out for the bucket (block tables `max_blocks` wide),
//! split-K sized for the longest context it takes. A batch smaller than its bucket is padded with
//! idle rows that attend only to themselves in the backend's reserved trash block.
//!
//! A bucket's graph is planned for `max_context`, and where the attention's split for a shorter
//! context tier (`GRAPH_CONTEXT_TIERS`) differs, the bucket gets a graph for that tier too: a
//! batch replays the graph of the shortest tier that holds its longest context. Without the
//! tiers, a short context replays a graph split for the longest one, most of whose split blocks
//! find nothing to read yet are still launched and merged. The tiers are on unless
//! `PAGEDSERVE_GRAPH_TIERS=off` (`GpuDevice::graph_tiers`); `check` always runs them.
//!
//! A graph ends at the logits: what picks the tokens (greedy `argmax_rows`, or the full sampler
//! of `cuda::sampling` in the serving path) is launched after the replay on the first `n` rows,
//! so one graph per bucket serves every mix of sampling parameters and padding rows are never
//! sampled. The extra launch costs a few microseconds against a replay of hundreds of kernels.

use std::collections::HashMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, LaunchConfig};

use super::launchers;
use super::model::ptr;
use super::launch::{graph_bucket, AttentionSplit, GRAPH_BUCKETS};
use super::batch::{BatchArrays, Scratch};
use super::model::GpuBackend;
use super::CudaError;
use crate::runner::ForwardBatch;

/// A captured graph. Graph handles are plain driver objects that any thread may launch once the
/// context is bound (cudarc binds it on every launch); the backend that owns them moves to the
/// engine thread and is used there alone.
struct SendGraph(CudaGraph);
// SAFETY: see above; the handle is never used from two threads at once (`&mut GpuBackend`).
unsafe impl Send for SendGraph {}

pub(crate) struct DecodeGraphs {
    /// The graphs point into it: it lives as long as they do. Its logits hold the last replay's.
    scratch: Scratch,
    indices: CudaSlice<u32>,
    tokens_out: CudaSlice<u32>,
    max_blocks: usize,
    max_context: usize,
    /// Each bucket's graphs with the longest context each takes (a tier or `max_context`),
    /// shortest first.
    graphs: HashMap<usize, Vec<(usize, SendGraph)>>,
    /// Replays are used only while on (`set_graphs_enabled`; benchmarks compare both ways).
    enabled: bool,
}

/// The shorter contexts a bucket may get a graph of its own for (see the module docs). On an
/// H200 a one-row 8B decode step at 512 positions took 4.845 ms through a graph split for 2048
/// positions against 4.781 ms through one split for 528 (BENCHMARKS.md, session 29).
pub const GRAPH_CONTEXT_TIERS: &[usize] = &[512, 2048, 8192, 32768];

/// The contexts graphs are planned for when they take up to `max_context` positions, longest
/// first: `max_context`, then each tier at most half of it (a tier close to `max_context` would
/// save next to nothing).
fn context_tiers(max_context: usize) -> Vec<usize> {
    let shorter = GRAPH_CONTEXT_TIERS.iter().rev().copied().filter(|&t| 2 * t <= max_context);
    std::iter::once(max_context).chain(shorter).collect()
}

/// Of a bucket's graphs (by the longest context each takes, shortest first), the index of the
/// first that holds `context` positions.
fn graph_for<G>(by_context: &[(usize, G)], context: usize) -> Option<usize> {
    by_context.iter().position(|&(longest, _)| longest >= context)
}

/// The packed index arrays of one bucket (see `layout`): real rows from `batch`, the rest idle.
fn pack(batch: Option<&ForwardBatch>, bucket: usize, max_blocks: usize, trash_block: u32, block_size: usize) -> Vec<u32> {
    let mut packed = vec![0u32; 5 * bucket + bucket * max_blocks];
    let (tokens, rest) = packed.split_at_mut(bucket);
    let (positions, rest) = rest.split_at_mut(bucket);
    let (slots, rest) = rest.split_at_mut(bucket);
    let (token_seq, rest) = rest.split_at_mut(bucket);
    let (tables, rows) = rest.split_at_mut(bucket * max_blocks);
    let real = batch.map_or(0, |b| b.num_tokens());
    for i in 0..bucket {
        token_seq[i] = i as u32;
        rows[i] = i as u32;
        if i < real {
            let b = batch.unwrap();
            tokens[i] = b.token_ids[i];
            positions[i] = b.positions[i];
            slots[i] = b.slot_mapping[i];
            let table = &b.seqs[b.token_seq[i] as usize].block_table;
            tables[i * max_blocks..i * max_blocks + table.len()].copy_from_slice(table);
        } else {
            slots[i] = trash_block * block_size as u32;
            tables[i * max_blocks] = trash_block;
        }
    }
    packed
}

/// Device pointers of a bucket's arrays inside the index buffer.
fn layout(base: u64, bucket: usize, max_blocks: usize) -> BatchArrays {
    let at = |offset: usize| base + (offset * 4) as u64;
    BatchArrays {
        tokens: at(0),
        positions: at(bucket),
        slots: at(2 * bucket),
        token_seq: at(3 * bucket),
        block_tables: at(4 * bucket),
        rows: at(4 * bucket + bucket * max_blocks),
        max_blocks,
        // Decode only: the decode attention kernel over every row, no prefill launch.
        tiles: 0,
        num_tiles: 0,
        decode_rows: 0,
        num_decode: bucket,
    }
}

impl GpuBackend {
    /// Captures a decode graph for every bucket up to `max_batch`, for sequences of at most
    /// `max_context` tokens, and more for shorter context tiers where the device takes them
    /// (`GpuDevice::graph_tiers`; see the module docs). Returns how many graphs it captured.
    pub fn capture_decode_graphs(&mut self, max_batch: usize, max_context: usize) -> Result<usize, CudaError> {
        let tiers = self.model().device().graph_tiers;
        self.capture_decode_graphs_tiered(max_batch, max_context, tiers)
    }

    /// `capture_decode_graphs` with the shorter context tiers on or off.
    pub fn capture_decode_graphs_tiered(&mut self, max_batch: usize, max_context: usize, tiers: bool) -> Result<usize, CudaError> {
        let dev = self.model().device().clone();
        let c = self.model().config().clone();
        let cache_layout = *self.cache().layout();
        let max_blocks = max_context.div_ceil(cache_layout.block_size);
        let largest = graph_bucket(max_batch).ok_or_else(|| CudaError::Config(format!("no graph bucket holds {max_batch}")))?;
        let slots = dev.decode_slots(c.head_dim);
        let buckets: Vec<usize> = GRAPH_BUCKETS.iter().copied().filter(|&b| b <= largest).collect();
        let split_of = |bucket: usize, context: usize| AttentionSplit::plan(c.attention_span(context), bucket * c.num_key_value_heads, slots);
        // Each bucket's graphs, longest context first, and each split: a shorter tier whose split
        // is the longer one's needs no graph of its own (that graph is the same one).
        let mut plans: Vec<(usize, usize, AttentionSplit)> = Vec::new();
        for &bucket in &buckets {
            let contexts = if tiers { context_tiers(max_context) } else { vec![max_context] };
            for context in contexts {
                let split = split_of(bucket, context);
                if plans.last().is_none_or(|&(b, _, longer)| b != bucket || longer != split) {
                    plans.push((bucket, context, split));
                }
            }
        }
        // Split-K partials are indexed by token row: a bucket of b rows and s splits uses b * s
        // rows per head. The most splits go with the smallest buckets, so size for the largest
        // product, not for the largest bucket times the most splits.
        let partial_rows = plans.iter().map(|&(b, _, split)| match split.splits { 1 => 0, s => b * s }).max().unwrap_or(0);
        let mut scratch = self.new_scratch();
        scratch.ensure(&dev, &c, largest, largest, partial_rows * c.num_attention_heads)?;
        let mut indices = dev.stream.alloc_zeros::<u32>(5 * largest + largest * max_blocks)?;
        let tokens_out = dev.stream.alloc_zeros::<u32>(largest)?;
        let base = super::model::ptr(&dev, &indices);
        let mut graphs: HashMap<usize, Vec<(usize, SendGraph)>> = HashMap::new();
        for (bucket, context, split) in plans {
            let packed = pack(None, bucket, max_blocks, self.trash_block(), cache_layout.block_size);
            dev.stream.memcpy_htod(&packed, &mut indices.slice_mut(..packed.len()))?;
            let arrays = layout(base, bucket, max_blocks);
            // A warm-up run outside the capture lets cuBLAS pick its kernels first.
            self.run_forward(&scratch, bucket, bucket, &arrays, split)?;
            dev.stream.synchronize()?;
            dev.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let enqueued = self.run_forward(&scratch, bucket, bucket, &arrays, split);
            let graph = dev.stream.end_capture(CUgraphInstantiate_flags(0))?;
            enqueued?;
            let graph = graph.ok_or_else(|| CudaError::Config("graph capture produced no graph".into()))?;
            graph.upload()?;
            // The plans go longest first: each bucket's list ends up shortest first.
            graphs.entry(bucket).or_default().insert(0, (context, SendGraph(graph)));
        }
        let captured = graphs.values().map(Vec::len).sum();
        self.graphs = Some(DecodeGraphs { scratch, indices, tokens_out, max_blocks, max_context, graphs, enabled: true });
        Ok(captured)
    }

    /// Turns the use of captured graphs on or off (they stay captured).
    pub fn set_graphs_enabled(&mut self, enabled: bool) {
        if let Some(g) = self.graphs.as_mut() {
            g.enabled = enabled;
        }
    }

    /// Greedy tokens of the first `rows` rows of the logits at `logits`.
    /// The backend `serve` (and `bench serve --device cuda`) runs: decode graphs captured for
    /// batches up to `max_num_seqs` (capped at the largest bucket) and contexts up to
    /// `max_model_len`, unless `graphs` is false. Returns the number of graphs captured.
    pub fn prepare_for_serving(&mut self, graphs: bool, max_num_seqs: usize, max_model_len: usize) -> Result<usize, CudaError> {
        if !graphs {
            tracing::info!("CUDA graphs off: decode steps launch kernel by kernel (small batches through the GEMV)");
            return Ok(0);
        }
        let captured = match self.capture_serving_graphs(max_num_seqs, max_model_len) {
            Err(e) if self.model().device().pdl() => {
                // A driver that cannot capture programmatic dependent launches (before CUDA
                // 12.3) fails here: serve without them rather than not at all. Any other error
                // (memory) fails the second capture too, and is returned from it.
                tracing::warn!(error = %e, "capturing the decode graphs failed with programmatic dependent launches on; retrying with them off");
                self.model().device().set_pdl(false);
                self.capture_serving_graphs(max_num_seqs, max_model_len)?
            }
            other => other?,
        };
        Ok(captured)
    }

    /// The decode graphs `prepare_for_serving` captures, once, with no retry: a tensor-parallel
    /// rank must not start its captures (and their collectives) over on its own.
    pub(crate) fn capture_serving_graphs(&mut self, max_num_seqs: usize, max_model_len: usize) -> Result<usize, CudaError> {
        // The small-batch GEMV stays on inside the graphs: with its one-wave grid, parallel
        // staging and the weight loads it issues before the previous kernel ends, it beats
        // cuBLAS at 1-2 rows of a large model and up to 8 rows of a small one (BENCHMARKS.md,
        // session 9).
        let largest = *GRAPH_BUCKETS.last().expect("buckets");
        let max_batch = max_num_seqs.min(largest);
        let started = std::time::Instant::now();
        let captured = self.capture_decode_graphs(max_batch, max_model_len)?;
        tracing::info!(
            graphs = captured,
            max_batch,
            max_context = max_model_len,
            seconds = started.elapsed().as_secs_f32(),
            "decode CUDA graphs captured"
        );
        Ok(captured)
    }

    pub(crate) fn launch_argmax(&self, logits: u64, out: &CudaSlice<u32>, rows: usize) -> Result<(), CudaError> {
        let dev = self.model().device();
        let vocab = self.model().config().vocab_size as i32;
        let config = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `logits` holds `rows` rows of `vocab`, `out` `rows` tokens.
        unsafe { launchers::argmax_rows(dev, config, ptr(dev, out), logits, vocab)? };
        Ok(())
    }

    /// The greedy tokens of a decode batch through its bucket's graph; `None` when the batch
    /// does not qualify (see `replay_decode_graph`).
    pub fn decode_argmax_graph(&mut self, batch: &ForwardBatch) -> Option<Result<Vec<u32>, CudaError>> {
        let replayed = self.replay_decode_graph(batch)?;
        let dev = self.model().device().clone();
        Some(replayed.and_then(|(logits, n)| {
            let graphs = self.graphs.as_ref().expect("just replayed");
            self.launch_argmax(logits, &graphs.tokens_out, n)?;
            let mut tokens = vec![0u32; n];
            dev.stream.memcpy_dtoh(&graphs.tokens_out.slice(..n), &mut tokens)?;
            Ok(tokens)
        }))
    }

    /// Replays the forward of a decode batch through its bucket's graph, leaving the logits on
    /// the device: returns their pointer and the number of real rows (the padding rows after
    /// them are garbage). `None` when the batch does not qualify (not all single-token, too big,
    /// context too long, no graphs captured or graphs turned off).
    pub(crate) fn replay_decode_graph(&mut self, batch: &ForwardBatch) -> Option<Result<(u64, usize), CudaError>> {
        let (bucket, index) = self.decode_graph_slot(batch)?;
        let n = batch.num_tokens();
        let graphs = self.graphs.as_ref().expect("a graph was found");
        let block_size = self.cache().layout().block_size;
        let packed = pack(Some(batch), bucket, graphs.max_blocks, self.trash_block(), block_size);
        let dev = self.model().device().clone();
        let result = (|| {
            // Token ids come first in the packed arrays (`layout`).
            let tokens = super::model::ptr(&dev, &self.graphs.as_ref().unwrap().indices);
            self.batch_staging.upload(&dev, self.forwards, &packed, tokens)?;
            self.apply_feed(tokens)?;
            let graphs = self.graphs.as_ref().unwrap();
            let (_, SendGraph(graph)) = &graphs.graphs[&bucket][index];
            graph.launch()?;
            Ok((super::model::ptr(&dev, graphs.scratch.logits.as_ref().expect("sized at capture")), n))
        })();
        Some(result)
    }

    /// The graph a decode batch replays, as (its bucket, the longest context it takes); `None`
    /// when the batch does not qualify (see `replay_decode_graph`).
    pub fn decode_graph_for(&self, batch: &ForwardBatch) -> Option<(usize, usize)> {
        let (bucket, index) = self.decode_graph_slot(batch)?;
        Some((bucket, self.graphs.as_ref()?.graphs[&bucket][index].0))
    }

    /// The graph a decode batch replays, as its bucket and its index in the bucket's list.
    fn decode_graph_slot(&self, batch: &ForwardBatch) -> Option<(usize, usize)> {
        let graphs = self.graphs.as_ref().filter(|g| g.enabled)?;
        let bucket = graph_bucket(batch.num_tokens())?;
        if !fits_graph(batch, graphs.max_blocks, graphs.max_context) {
            return None;
        }
        let context = batch.seqs.iter().map(|s| s.context_len()).max().unwrap_or(0);
        Some((bucket, graph_for(graphs.graphs.get(&bucket)?, context)?))
    }
}

/// Whether a batch can run as a decode graph captured for `max_blocks` / `max_context`: every
/// sequence computes exactly one token and wants its logits, within the captured sizes.
fn fits_graph(batch: &ForwardBatch, max_blocks: usize, max_context: usize) -> bool {
    let n = batch.num_tokens();
    n > 0
        && batch.seqs.len() == n
        && batch.logits_rows.len() == n
        && batch.seqs.iter().all(|s| s.block_table.len() <= max_blocks && s.context_len() <= max_context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_pads_idle_rows_into_the_trash_block() {
        let mut batch = ForwardBatch::new(16, 10);
        batch.push_seq(&[7], 20, &[3, 4], true).unwrap();
        batch.push_seq(&[8], 0, &[5], true).unwrap();
        let packed = pack(Some(&batch), 4, 3, 9, 16);
        let arrays = layout(0, 4, 3);
        let at = |ptr: u64, i: usize| packed[ptr as usize / 4 + i];
        assert_eq!((at(arrays.tokens, 0), at(arrays.tokens, 1), at(arrays.tokens, 2)), (7, 8, 0));
        assert_eq!((at(arrays.positions, 0), at(arrays.positions, 3)), (20, 0));
        assert_eq!(at(arrays.slots, 0), 4 * 16 + 4, "position 20 is block 4, offset 4");
        assert_eq!(at(arrays.slots, 3), 9 * 16, "idle rows write to the trash block");
        let tables: Vec<u32> = (0..12).map(|i| at(arrays.block_tables, i)).collect();
        assert_eq!(tables, vec![3, 4, 0, 5, 0, 0, 9, 0, 0, 9, 0, 0]);
        assert_eq!((0..4).map(|i| at(arrays.rows, i)).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(packed.len(), 5 * 4 + 4 * 3);
    }

    #[test]
    fn shorter_context_tiers_are_at_most_half_the_longest() {
        assert_eq!(context_tiers(2048), vec![2048, 512]);
        assert_eq!(context_tiers(528), vec![528], "the bench's 512 + 16: no tier worth a graph");
        assert_eq!(context_tiers(1024), vec![1024, 512]);
        assert_eq!(context_tiers(4096), vec![4096, 2048, 512]);
        assert_eq!(context_tiers(131072), vec![131072, 32768, 8192, 2048, 512]);
        assert_eq!(context_tiers(100), vec![100]);
    }

    #[test]
    fn a_batch_replays_the_shortest_graph_that_holds_its_context() {
        let tiered = [(512, ()), (2048, ())];
        assert_eq!(graph_for(&tiered, 300), Some(0));
        assert_eq!(graph_for(&tiered, 512), Some(0), "a tier holds exactly its length");
        assert_eq!(graph_for(&tiered, 513), Some(1));
        assert_eq!(graph_for(&tiered, 2048), Some(1));
        assert_eq!(graph_for(&tiered, 2049), None);
        assert_eq!(graph_for(&[(2048, ())], 10), Some(0), "no tier graph: its split was the longest one's");
        assert_eq!(graph_for::<()>(&[], 10), None, "a bucket not captured");
    }

    #[test]
    fn only_decode_batches_within_the_captured_sizes_use_graphs() {
        let mut decode = ForwardBatch::new(16, 100);
        decode.push_seq(&[7], 20, &[3, 4], true).unwrap();
        decode.push_seq(&[8], 0, &[5], true).unwrap();
        assert!(fits_graph(&decode, 2, 64));
        assert!(!fits_graph(&decode, 1, 64), "a block table wider than captured");
        assert!(!fits_graph(&decode, 2, 20), "a context longer than captured");
        let mut prefill = decode.clone();
        prefill.push_seq(&[1, 2, 3], 0, &[6], true).unwrap();
        assert!(!fits_graph(&prefill, 2, 64), "a prefill chunk");
        let mut silent = ForwardBatch::new(16, 100);
        silent.push_seq(&[7], 3, &[3], false).unwrap();
        assert!(!fits_graph(&silent, 2, 64), "a token without logits");
        assert!(!fits_graph(&ForwardBatch::new(16, 100), 2, 64), "an empty batch");
    }
}
