//! GPU benchmarks (`pagedserve bench gpu`), each beside the ceiling it is judged by, measured in
//! the same run: device-to-device copy bandwidth; paged-attention decode for a Llama-3.1-8B head
//! layout against that bandwidth; prefill attention (the flash-style kernel against the per-token
//! decode kernel on the same inputs, in TFLOP/s); the small-M GEMV against cuBLAS on SmolLM2's
//! products; decode step time of the default model at batch 1, 64 and 256, with a per-kernel
//! breakdown of the step; and
//! the step time of a Llama-3.1-8B-shaped dummy model against its bandwidth floor (weights plus
//! KV bytes over measured bandwidth). Times are medians over repeated runs after a warm-up,
//! taken with CUDA events.

use std::sync::Arc;

use half::bf16;

use super::median;
use crate::cuda::gemm::{cublas_linear, linear, OutType};
use crate::cuda::gemv::{gemv, Gemv, GemvInput, GemvWeight};
use crate::cuda::launch::{decode_kernel_name, gemv_supports, prefill_kernel_name, AttentionPath, AttentionSplit, WeightFormat};
use crate::cuda::profile::{KindTime, StepProfiler};
use crate::cuda::{ptr, CudaError, GpuBackend, GpuDevice, GpuModel};
use crate::kv_cache::{KvCacheDtype, DEFAULT_BLOCK_SIZE};
use crate::model::ModelConfig;
use crate::runner::ForwardBatch;

/// Median milliseconds of `f` over `repeats` runs after `warmup`, timed with events.
pub fn time_ms(dev: &GpuDevice, warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = dev.context.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = dev.context.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&dev.stream)?;
        f()?;
        end.record(&dev.stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    Ok(median(&mut times))
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.
pub fn copy_bandwidth(dev: &GpuDevice, bytes: usize) -> Result<f64, CudaError> {
    let src = dev.stream.alloc_zeros::<u8>(bytes)?;
    let dst = dev.stream.alloc_zeros::<u8>(bytes)?;
    let (s, d) = (ptr(dev, &src), ptr(dev, &dst));
    let ms = time_ms(dev, 3, 20, || {
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, dev.stream.cu_stream())? };
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

pub struct AttentionBench {
    pub ms: f64,
    pub bytes: usize,
    pub gbps: f64,
    /// Split-K partitions the planner chose.
    pub splits: usize,
}

/// Cheap deterministic values in [-1, 1] (never zeros: they would hide unwritten outputs and can
/// run faster than real data).
fn pseudo_random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    (0..n).map(|i| bf16::from_f32((((i as u64 * 2654435761 + seed) % 2001) as f32 / 1000.0) - 1.0)).collect()
}

/// `seqs` sequences of `context` positions whose last `new` tokens are in the batch, each block
/// table interleaved with the others' so it is scattered across the pool. Returns the batch and
/// the pool's size in blocks.
fn scattered_batch(seqs: usize, new: usize, context: usize, block_size: usize) -> Result<(ForwardBatch, usize), CudaError> {
    scattered_batch_of(&vec![context; seqs], new, block_size)
}

/// `scattered_batch` with each sequence's own context (the pool is laid out for the longest).
fn scattered_batch_of(contexts: &[usize], new: usize, block_size: usize) -> Result<(ForwardBatch, usize), CudaError> {
    let seqs = contexts.len();
    let most_blocks = contexts.iter().max().map_or(0, |c| c.div_ceil(block_size));
    let num_blocks = seqs * most_blocks;
    let mut fb = ForwardBatch::new(block_size, num_blocks);
    for (b, &context) in contexts.iter().enumerate() {
        let table: Vec<u32> = (0..context.div_ceil(block_size)).map(|i| (i * seqs + b) as u32).collect();
        fb.push_seq(&vec![1; new], context - new, &table, true).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    Ok((fb, num_blocks))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `batch` contexts spread evenly from 64 positions up to `longest`, as in a running batch whose
/// sequences are at different points of their prompts and answers.
pub fn ramp_contexts(batch: usize, longest: usize) -> Vec<usize> {
    let shortest = 64.min(longest);
    (0..batch).map(|i| if batch == 1 { longest } else { shortest + (longest - shortest) * i / (batch - 1) }).collect()
}

/// `count` pseudo-random values (`pseudo_random_bf16`'s) as float32: a cache layer's keys or
/// values, which `StandaloneAttention::upload` stores as the cache type says.
fn pseudo_random_cache(count: usize, seed: u64) -> Vec<f32> {
    pseudo_random_bf16(count, seed).iter().map(|v| v.to_f32()).collect()
}

/// Decode attention (one query token per sequence) over `context` cached positions of `cache`,
/// split as `AttentionSplit::plan` says.
pub fn attention_decode(
    dev: &GpuDevice,
    batch: usize,
    context: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cache: KvCacheDtype,
) -> Result<AttentionBench, CudaError> {
    let splits = AttentionSplit::plan(context, batch * kv_heads, dev.decode_slots(head_dim)).splits;
    let layout = (heads, kv_heads, head_dim);
    Ok(attention_decode_splits(dev, &vec![context; batch], layout, cache, DEFAULT_BLOCK_SIZE, &[splits], 1)?.remove(0))
}

/// `attention_decode` at each of `splits` (each as `AttentionSplit::covering` rounds it), over
/// one uploaded cache of blocks of `block_size` positions (`serve --block-size`); each time is the
/// median launch of bursts of `burst` back-to-back launches (a burst hides the host's launch
/// latency, as a graph does, from kernels of a few µs).
pub fn attention_decode_splits(
    dev: &GpuDevice,
    contexts: &[usize],
    (heads, kv_heads, head_dim): (usize, usize, usize),
    cache: KvCacheDtype,
    block_size: usize,
    splits: &[usize],
    burst: usize,
) -> Result<Vec<AttentionBench>, CudaError> {
    let batch = contexts.len();
    let (fb, num_blocks) = scattered_batch_of(contexts, 1, block_size)?;
    let cache_len = num_blocks * kv_heads * block_size * head_dim;
    let most = splits.iter().copied().max().unwrap_or(1);
    let mut attention = crate::cuda::StandaloneAttention::upload(
        dev,
        &fb,
        &pseudo_random_bf16(batch * heads * head_dim, 3),
        &pseudo_random_cache(cache_len, 1),
        &pseudo_random_cache(cache_len, 2),
        cache,
        heads,
        kv_heads,
        head_dim,
        AttentionPath::Decode,
        most,
    )?;
    // K and V of every cached position, read once; q and out are negligible.
    let bytes = 2 * contexts.iter().sum::<usize>() * kv_heads * head_dim * cache.bytes_per_value(2);
    let burst = burst.max(1);
    let mut benches = Vec::with_capacity(splits.len());
    for &wanted in splits {
        attention.set_splits(wanted);
        let ms = time_ms(dev, 5, 50, || (0..burst).try_for_each(|_| attention.launch(dev)))? / burst as f64;
        benches.push(AttentionBench { ms, bytes, gbps: bytes as f64 / (ms * 1e-3) / 1e9, splits: attention.splits() });
    }
    Ok(benches)
}

/// `bench gpu --attention-sweep`: the 8B layout's decode attention at each batch and longest
/// context, with all sequences that long (`even`) and with their contexts spread from 64 up to
/// it (`ramp_contexts`: shortest first, `ramp`; longest first, `desc`; shuffled, `shuf`; block x
/// of the launch takes sequence x), at each of `splits` beside the one `AttentionSplit::plan` picks
/// (planned, as the server plans, for the longest context): what the planner's wave model leaves
/// on the table; at each of `block_sizes` (cache blocks of that many positions, each sequence's
/// blocks dealt out in turn over the pool, so that a block's keys are one contiguous stretch of
/// `block_size` rows a KV head and its neighbours in the sequence are not). Caches of more than
/// 2^18 positions in all are skipped.
pub fn print_attention_sweep(
    dev: &GpuDevice,
    copy_gbps: f64,
    batches: &[usize],
    contexts: &[usize],
    splits: &[usize],
    block_sizes: &[usize],
) -> Result<(), CudaError> {
    for &block_size in block_sizes {
        sweep_block_size(dev, copy_gbps, batches, contexts, splits, block_size)?;
    }
    Ok(())
}

/// `print_attention_sweep` over cache blocks of `block_size` positions.
fn sweep_block_size(dev: &GpuDevice, copy_gbps: f64, batches: &[usize], contexts: &[usize], splits: &[usize], block_size: usize) -> Result<(), CudaError> {
    let (heads, kv_heads, head_dim) = (32, 8, 128);
    let slots = dev.decode_slots(head_dim);
    for &context in contexts {
        // Larger caches take long to fill from the host and add nothing the wave model lacks.
        for &batch in batches.iter().filter(|&&b| b * context <= 1 << 18) {
            let planned = AttentionSplit::plan(context, batch * kv_heads, slots).splits;
            let mut candidates: Vec<usize> = splits.iter().map(|&s| AttentionSplit::covering(s, context).splits).collect();
            candidates.push(planned);
            candidates.sort_unstable();
            candidates.dedup();
            let ramp = ramp_contexts(batch, context);
            let descending: Vec<usize> = ramp.iter().rev().copied().collect();
            // A fixed shuffle (a multiplicative step through the indices), as a server's batch
            // order is neither.
            let step = (batch * 5 / 8) | 1;
            let step = (step..batch.max(2)).find(|s| gcd(*s, batch) == 1).unwrap_or(1);
            let shuffled: Vec<usize> = (0..batch).map(|i| ramp[(i * step) % batch]).collect();
            for (label, lens) in [("even", vec![context; batch]), ("ramp", ramp), ("desc", descending), ("shuf", shuffled)] {
                let runs = attention_decode_splits(dev, &lens, (heads, kv_heads, head_dim), KvCacheDtype::Auto, block_size, &candidates, 20)?;
                let best = runs.iter().min_by(|a, b| a.ms.total_cmp(&b.ms)).expect("at least one split");
                let at_plan = runs.iter().find(|r| r.splits == planned).expect("the plan is a candidate");
                let cells: Vec<String> = runs.iter().map(|r| format!("{}:{:.1}", r.splits, r.ms * 1e3)).collect();
                println!(
                    "attention sweep 8B bs{block_size:<3} {label} b{batch:<4} c{context:<5} plan {planned:<2} {:>7.1} us ({:>4.1}% of copy) | best {:<2} {:>7.1} us ({:>4.1}%) | us by splits {}",
                    at_plan.ms * 1e3,
                    100.0 * at_plan.gbps / copy_gbps,
                    best.splits,
                    best.ms * 1e3,
                    100.0 * best.gbps / copy_gbps,
                    cells.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// The head layouts the attention rows of `bench gpu` run: (name, query heads, KV heads, head
/// dim) of Llama-3.1-8B and of SmolLM2.
const ATTENTION_LAYOUTS: [(&str, usize, usize, usize); 2] = [("8B", 32, 8, 128), ("SmolLM2", 9, 3, 64)];

/// Prints a kernel's registers and local memory (spills), and `extra` after them.
pub fn print_kernel_resources(dev: &GpuDevice, name: &str, extra: &str) -> Result<(), CudaError> {
    let function = dev.function(name);
    println!(
        "{name}: {} registers, {} bytes of local memory per thread{extra}",
        function.num_regs()?,
        function.local_size_bytes()?
    );
    Ok(())
}

/// The caches the attention rows run over, each with its label (FP8 only where the device has
/// the E4M3 conversions).
fn attention_caches(dev: &GpuDevice) -> Vec<(KvCacheDtype, &'static str)> {
    let mut caches = vec![(KvCacheDtype::Auto, "bf16")];
    if dev.compute_capability() >= 89 {
        caches.push((KvCacheDtype::Fp8E4M3, "fp8"));
    }
    caches
}

/// The decode attention rows of `bench gpu`: the Llama-3.1-8B head layout (32/8, head dim 128)
/// at the batch 64, context 2048, and beside it batch 1 and batch 256 at shorter
/// contexts, then SmolLM2's layout (9/3, head dim 64); each against the copy bandwidth, over a
/// bf16 cache and an FP8 one (whose GB/s count its own, half as many, bytes).
pub fn print_attention_decode(dev: &GpuDevice, copy_gbps: f64) -> Result<(), CudaError> {
    for head_dim in crate::cuda::DECODE_HEAD_DIMS {
        let blocks = format!(", {} blocks per SM", dev.decode_slots(head_dim) / dev.num_sms);
        for (cache, _) in attention_caches(dev) {
            print_kernel_resources(dev, &decode_kernel_name(head_dim, cache), &blocks)?;
        }
    }
    for (name, heads, kv_heads, head_dim) in ATTENTION_LAYOUTS {
        for (batch, context) in [(64, 2048), (1, 2048), (256, 512), (1, 512)] {
            for (cache, label) in attention_caches(dev) {
                let r = attention_decode(dev, batch, context, heads, kv_heads, head_dim, cache)?;
                println!(
                    "paged attention {name:<7} {label:<4} b{batch:<3} c{context:<4} {:>9.3} ms {:>7.0} GB/s {:>5.1}% of copy  ({} splits)",
                    r.ms,
                    r.gbps,
                    100.0 * r.gbps / copy_gbps,
                    r.splits
                );
            }
        }
    }
    Ok(())
}

pub struct PrefillBench {
    /// The flash-style prefill kernel.
    pub prefill_ms: f64,
    /// The per-token decode kernel on the same inputs (what every prefill used before).
    pub decode_kernel_ms: f64,
    /// Causal attention flops: 4 * query tokens * mean keys per query * head_dim * heads.
    pub flops: f64,
}

impl PrefillBench {
    pub fn tflops(&self, ms: f64) -> f64 {
        self.flops / (ms * 1e-3) / 1e12
    }
}

/// Prefill attention of `seqs` sequences of `len` new tokens each from position 0 (their keys
/// already in the cache, as `rope_and_cache` leaves them), in scattered blocks: the prefill kernel
/// against the decode kernel run over every token, on the same inputs.
pub fn attention_prefill(
    dev: &GpuDevice,
    seqs: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cache: KvCacheDtype,
) -> Result<PrefillBench, CudaError> {
    let block_size = 16;
    let (fb, num_blocks) = scattered_batch(seqs, len, len, block_size)?;
    let n = fb.num_tokens();
    let cache_len = num_blocks * kv_heads * block_size * head_dim;
    let (q, k, v) = (pseudo_random_bf16(n * heads * head_dim, 3), pseudo_random_cache(cache_len, 1), pseudo_random_cache(cache_len, 2));
    let upload = |path: AttentionPath, splits: usize| {
        crate::cuda::StandaloneAttention::upload(dev, &fb, &q, &k, &v, cache, heads, kv_heads, head_dim, path, splits)
    };
    let prefill = upload(AttentionPath::Mixed, 1)?;
    let prefill_ms = time_ms(dev, 5, 30, || prefill.launch(dev))?;
    drop(prefill);
    let decode = upload(AttentionPath::Decode, AttentionSplit::plan(len, n * kv_heads, dev.decode_slots(head_dim)).splits)?;
    let decode_kernel_ms = time_ms(dev, 3, 10, || decode.launch(dev))?;
    let mean_keys = (len + 1) as f64 / 2.0;
    let flops = 4.0 * n as f64 * mean_keys * head_dim as f64 * heads as f64;
    Ok(PrefillBench { prefill_ms, decode_kernel_ms, flops })
}

/// The prefill attention rows of `bench gpu`: one 2048-token sequence and 8 x 512 tokens, in the
/// Llama-3.1-8B head layout (32/8, head dim 128) and SmolLM2's (9/3, head dim 64).
pub fn print_attention_prefill(dev: &GpuDevice) -> Result<(), CudaError> {
    for head_dim in crate::cuda::DECODE_HEAD_DIMS {
        for (cache, _) in attention_caches(dev) {
            print_kernel_resources(dev, &prefill_kernel_name(head_dim, cache), "")?;
        }
    }
    for (name, heads, kv_heads, head_dim) in ATTENTION_LAYOUTS {
        for (seqs, len) in [(1, 2048), (8, 512)] {
            for (cache, label) in attention_caches(dev) {
                let r = attention_prefill(dev, seqs, len, heads, kv_heads, head_dim, cache)?;
                println!(
                    "prefill attention {name:<7} {label:<4} {seqs}x{len:<5} flash {:>8.3} ms {:>6.1} TFLOP/s | per-token decode kernel {:>8.3} ms {:>6.1} TFLOP/s | {:>5.1}x",
                    r.prefill_ms,
                    r.tflops(r.prefill_ms),
                    r.decode_kernel_ms,
                    r.tflops(r.decode_kernel_ms),
                    r.decode_kernel_ms / r.prefill_ms
                );
            }
        }
    }
    Ok(())
}

/// A decode step of `batch` sequences at `context` positions each, in consecutive blocks of the
/// backend's cache (wrapping around when it is smaller).
fn decode_batch(backend: &GpuBackend, batch: usize, context: usize) -> Result<ForwardBatch, CudaError> {
    let block_size = backend.cache().layout().block_size;
    let blocks_per_seq = context.div_ceil(block_size);
    let num_blocks = backend.cache().layout().num_blocks;
    let mut fb = ForwardBatch::new(block_size, num_blocks);
    for b in 0..batch {
        let table: Vec<u32> = (0..blocks_per_seq).map(|i| ((b * blocks_per_seq + i) % num_blocks) as u32).collect();
        fb.push_seq(&[(b % 1000) as u32 + 100], context - 1, &table, true).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    Ok(fb)
}

/// Where one eager decode step's time goes, by kind of launch (see `cuda::profile`): the step
/// queued behind ~8 ms of copies so its launches run back to back, `repeats` times; each kind's
/// median µs per step and its launches per step, plus the step's total (sum of the intervals).
pub fn step_breakdown(backend: &mut GpuBackend, batch: usize, context: usize, repeats: usize) -> Result<(Vec<(KindTime, f64)>, f64), CudaError> {
    let fb = decode_batch(backend, batch, context)?;
    let dev = backend.model().device().clone();
    let bytes = 256 << 20;
    let (src, dst) = (dev.stream.alloc_zeros::<u8>(bytes)?, dev.stream.alloc_zeros::<u8>(bytes)?);
    backend.forward_argmax(&fb)?; // sizes the buffers
    let mut runs: Vec<Vec<KindTime>> = Vec::new();
    for _ in 0..repeats {
        // SAFETY: both buffers outlive the step (`finish` waits for it).
        let profiler = unsafe { StepProfiler::with_head_start(ptr(&dev, &src), ptr(&dev, &dst), bytes, 48) };
        backend.swap_profiler(Some(profiler));
        let result = backend.forward_argmax(&fb);
        let profiler = backend.swap_profiler(None).expect("installed above");
        result?;
        runs.push(profiler.finish()?);
    }
    let mut rows = Vec::new();
    for kind in &runs[0] {
        let mut times: Vec<f64> = runs.iter().filter_map(|r| r.iter().find(|k| k.kind == kind.kind)).map(|k| k.ms * 1e3).collect();
        rows.push((kind.clone(), median(&mut times)));
    }
    let mut totals: Vec<f64> = runs.iter().map(|r| r.iter().map(|k| k.ms * 1e3).sum()).collect();
    Ok((rows, median(&mut totals)))
}

/// Prints `step_breakdown` as a table.
pub fn print_step_breakdown(backend: &mut GpuBackend, batch: usize, context: usize, label: &str) -> Result<(), CudaError> {
    let (rows, total_us) = step_breakdown(backend, batch, context, 15)?;
    println!("step breakdown b{batch} c{context} {label} (eager, launches queued back to back; µs):");
    println!("  {:<26} {:>6} {:>9} {:>10} {:>6}", "kind", "count", "µs each", "µs/step", "%");
    for (k, us) in &rows {
        println!("  {:<26} {:>6} {:>9.2} {:>10.1} {:>5.1}%", k.kind, k.count, us / k.count as f64, us, 100.0 * us / total_us);
    }
    println!("  {:<26} {:>6} {:>9} {:>10.1}", "step", rows.iter().map(|(k, _)| k.count).sum::<usize>(), "", total_us);
    Ok(())
}

/// One shape of `gemv_vs_cublas`.
pub struct GemvBench {
    pub n: usize,
    pub k: usize,
    pub gemv_us: f64,
    pub cublas_us: f64,
}

impl GemvBench {
    /// Weight bytes over time, in GB/s (the input and output are negligible).
    pub fn gbps(&self, us: f64) -> f64 {
        (self.n * self.k * 2) as f64 / (us * 1e-6) / 1e9
    }
}

/// `out[m×n] = x[m×k] · Wᵀ` through our GEMV and through cuBLAS, for each `(n, k)`: µs per
/// product, from a captured graph of back-to-back products (as a decode graph runs them) that
/// cycle through enough copies of the weight to cover 256 MB, so L2 (50 MB) cannot hold them.
/// µs per call of `product(i)` (`i` = 0, 1, ...) from a captured graph of `launches` calls back
/// to back, after one call outside the capture (so cuBLAS picks its kernel).
fn graph_us(
    dev: &GpuDevice,
    launches: usize,
    product: impl Fn(usize) -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    product(0)?;
    dev.stream.synchronize()?;
    dev.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let enqueued = (0..launches).try_for_each(&product);
    let graph = dev.stream.end_capture(CUgraphInstantiate_flags(0))?;
    enqueued?;
    let graph = graph.ok_or_else(|| CudaError::Config("graph capture produced no graph".into()))?;
    Ok(time_ms(dev, 2, 10, || Ok(graph.launch()?))? * 1e3 / launches as f64)
}

pub fn gemv_vs_cublas(
    dev: &GpuDevice,
    m: usize,
    shapes: &[(usize, usize, OutType)],
) -> Result<Vec<GemvBench>, CudaError> {
    // At least 256 MB, and at least the largest weight (the 8B head is 1 GB).
    let pool_elements = shapes.iter().map(|&(n, k, _)| n * k).max().unwrap_or(0).max(128 << 20);
    let pool = dev.stream.clone_htod(&pseudo_random_bf16(pool_elements, 5))?;
    let mut results = Vec::new();
    for &(n, k, out_type) in shapes {
        let x = dev.stream.clone_htod(&pseudo_random_bf16(m * k, 6))?;
        let out = dev.stream.alloc_zeros::<f32>(m * n)?;
        let copies = (pool_elements / (n * k)).max(1);
        let launches = copies.max(16);
        let weight = |i: usize| ptr(dev, &pool) + ((i % copies) * n * k * 2) as u64;
        let time = |cublas: bool| -> Result<f64, CudaError> {
            graph_us(dev, launches, |i: usize| unsafe {
                if cublas {
                    cublas_linear(dev, ptr(dev, &out), out_type, ptr(dev, &x), weight(i), m, k, n)
                } else {
                    linear(dev, ptr(dev, &out), out_type, ptr(dev, &x), weight(i), m, k, n)
                }
            })
        };
        let gemv_us = time(false)?;
        let cublas_us = time(true)?;
        results.push(GemvBench { n, k, gemv_us, cublas_us });
    }
    Ok(results)
}

/// The SmolLM2-135M products: qkv, o, gate_up, down, lm_head (float32 logits).
pub const SMOLLM2_PRODUCTS: [(usize, usize, OutType); 5] = [
    (960, 576, OutType::Bf16),
    (576, 576, OutType::Bf16),
    (3072, 576, OutType::Bf16),
    (576, 1536, OutType::Bf16),
    (49152, 576, OutType::F32),
];

/// The Llama-3.1-8B products, in the same order.
pub const LLAMA_8B_PRODUCTS: [(usize, usize, OutType); 5] = [
    (6144, 4096, OutType::Bf16),
    (4096, 4096, OutType::Bf16),
    (28672, 4096, OutType::Bf16),
    (4096, 14336, OutType::Bf16),
    (128_256, 4096, OutType::F32),
];

/// `shapes` at `m` rows, our path (`linear`: the GEMV where it takes the shape) against cuBLAS,
/// with each one's weight bandwidth; then the sums of a layer's products (all but the last shape)
/// and of all of them, the weight stream of one layer set plus the head.
pub fn print_gemv_vs_cublas(dev: &GpuDevice, label: &str, m: usize, shapes: &[(usize, usize, OutType)]) -> Result<(), CudaError> {
    println!("{label} products at m={m} (in a graph, weights cycled past L2):");
    println!("  {:>6} {:>6} {:>10} {:>8} {:>12} {:>8} {:>8}", "N", "K", "ours µs", "GB/s", "cuBLAS µs", "GB/s", "speedup");
    let results = gemv_vs_cublas(dev, m, shapes)?;
    for r in &results {
        println!(
            "  {:>6} {:>6} {:>10.2} {:>8.0} {:>12.2} {:>8.0} {:>7.2}x",
            r.n,
            r.k,
            r.gemv_us,
            r.gbps(r.gemv_us),
            r.cublas_us,
            r.gbps(r.cublas_us),
            r.cublas_us / r.gemv_us
        );
    }
    // A layer's products (all but the last shape, the head) and everything: the head's single
    // stream weighs as much as a layer's four products at 8B and hides how they compare.
    let sum_line = |name: &str, rows: &[GemvBench]| {
        let bytes: usize = rows.iter().map(|r| r.n * r.k * 2).sum();
        let (ours, cublas): (f64, f64) = (rows.iter().map(|r| r.gemv_us).sum(), rows.iter().map(|r| r.cublas_us).sum());
        let gbps = |us: f64| bytes as f64 / (us * 1e-6) / 1e9;
        println!("  {name:>13} {ours:>10.2} {:>8.0} {cublas:>12.2} {:>8.0} {:>7.2}x", gbps(ours), gbps(cublas), cublas / ours);
    };
    if results.len() > 2 {
        sum_line("layer", &results[..results.len() - 1]);
    }
    sum_line("all", &results);
    Ok(())
}

/// One shape of `fp8_products`: µs per product on each path (`None` where the GEMV does not
/// take the shape).
pub struct Fp8Bench {
    pub n: usize,
    pub k: usize,
    pub gemv_us: Option<f64>,
    pub gemm_us: f64,
    pub bf16_us: f64,
}

/// `out[m×n] = x[m×k] · Wᵀ` (bf16 out) with W in FP8 through the FP8 GEMV and through cuBLASLt's
/// FP8 GEMM (its input quantization included), and with W in bf16 through cuBLAS, timed as
/// `gemv_vs_cublas` times them (weights cycled past L2).
pub fn fp8_products(
    dev: &GpuDevice,
    m: usize,
    shapes: &[(usize, usize, OutType)],
) -> Result<Vec<Fp8Bench>, CudaError> {
    use crate::cuda::fp8_gemm::{fp8_linear, Fp8Product};
    use crate::cuda::weights::{GpuMatrix, MatrixData};
    // The same values in FP8: the pool as one matrix of rows of the first shape's K.
    let k0 = shapes.first().map_or(1, |s| s.1);
    let pool_elements = shapes
        .iter()
        .map(|&(n, k, _)| n * k)
        .max()
        .unwrap_or(0)
        .max(128 << 20)
        .next_multiple_of(k0);
    let pool = dev
        .stream
        .clone_htod(&pseudo_random_bf16(pool_elements, 5))?;
    let mut pool8 = GpuMatrix { rows: pool_elements / k0, cols: k0, data: MatrixData::Bf16(pool.clone()), bias: None };
    pool8.quantize_fp8(dev)?;
    let MatrixData::Fp8 { values: pool8_values, .. } = &pool8.data
    else {
        unreachable!("quantized above")
    };
    let scales = dev.stream.clone_htod(&vec![1.0f32 / 448.0; shapes.iter().map(|s| s.0).max().unwrap_or(1)])?;
    let mut results = Vec::new();
    for &(n, k, _) in shapes {
        let x = dev.stream.clone_htod(&pseudo_random_bf16(m * k, 6))?;
        let out = dev.stream.alloc_zeros::<bf16>(m * n)?;
        let (input_fp8, input_scales) = (dev.stream.alloc_zeros::<u8>(m * k)?, dev.stream.alloc_zeros::<f32>(m)?);
        let copies = (pool_elements / (n * k)).max(1);
        let launches = copies.max(16);
        let bf16_weight = |i: usize| ptr(dev, &pool) + ((i % copies) * n * k * 2) as u64;
        let fp8_weight = |i: usize| ptr(dev, pool8_values) + ((i % copies) * n * k) as u64;
        let gemv_us = if gemv_supports(m, k, WeightFormat::Fp8) {
            Some(graph_us(dev, launches, |i| unsafe {
                let w = GemvWeight::Fp8 { values: fp8_weight(i), scales: ptr(dev, &scales) };
                gemv(dev, &Gemv { out: ptr(dev, &out), out_type: OutType::Bf16, input: GemvInput::Plain(ptr(dev, &x)), w, bias: 0, m, k, n })
            })?)
        } else {
            None
        };
        let gemm_us = graph_us(dev, launches, |i| unsafe {
            let p = Fp8Product {
                out: ptr(dev, &out),
                input: ptr(dev, &x),
                weight: fp8_weight(i),
                weight_scales: ptr(dev, &scales),
                input_fp8: ptr(dev, &input_fp8),
                input_scales: ptr(dev, &input_scales),
                m,
                k,
                n,
            };
            fp8_linear(dev, &p)
        })?;
        let bf16_us = graph_us(dev, launches, |i| unsafe {
            cublas_linear(dev, ptr(dev, &out), OutType::Bf16, ptr(dev, &x), bf16_weight(i), m, k, n)
        })?;
        results.push(Fp8Bench { n, k, gemv_us, gemm_us, bf16_us });
    }
    Ok(results)
}

/// `fp8_products` of `shapes` at `m` rows, with the FP8 weight bandwidth of each path and the sum.
pub fn print_fp8_products(
    dev: &GpuDevice,
    label: &str,
    m: usize,
    shapes: &[(usize, usize, OutType)],
) -> Result<(), CudaError> {
    println!("{label} FP8 products at m={m} (in a graph, weights cycled past L2; GB/s of FP8 weight bytes):");
    println!("  {:>6} {:>6} {:>14} {:>7} {:>14} {:>7} {:>14}", "N", "K", "FP8 GEMV µs", "GB/s", "cuBLASLt µs", "GB/s", "bf16 cuBLAS µs");
    let results = fp8_products(dev, m, shapes)?;
    let gbps = |n: usize, k: usize, us: f64| (n * k) as f64 / (us * 1e-6) / 1e9;
    for r in &results {
        let gemv = r.gemv_us.map_or("-".to_string(), |us| format!("{us:.2}"));
        let gemv_gbps = r
            .gemv_us
            .map_or("-".to_string(), |us| format!("{:.0}", gbps(r.n, r.k, us)));
        println!("  {:>6} {:>6} {:>14} {:>7} {:>14.2} {:>7.0} {:>14.2}", r.n, r.k, gemv, gemv_gbps, r.gemm_us, gbps(r.n, r.k, r.gemm_us), r.bf16_us);
    }
    let sum = |f: &dyn Fn(&Fp8Bench) -> Option<f64>| results.iter().map(f).sum::<Option<f64>>();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |us| format!("{us:.2}"));
    println!(
        "  {:>13} {:>14} {:>7} {:>14} {:>7} {:>14}",
        "all",
        fmt(sum(&|r| r.gemv_us)),
        "",
        fmt(sum(&|r| Some(r.gemm_us))),
        "",
        fmt(sum(&|r| Some(r.bf16_us)))
    );
    Ok(())
}

/// Products of `m` rows against `ty` blocks at each of `shapes` (the weights cycled past L2 as in
/// `gemv_vs_cublas`), µs per product on every path that takes them: the GEMV (m ≤ 8), MMQ without
/// and with splits of k (`launch::mmq_supports`), dequantized tiles and cuBLAS; and bf16 cuBLAS on
/// the same shape. Printed with each path's bandwidth of `ty` blocks, then the sums.
pub fn print_ggml_products(dev: &GpuDevice, ty: crate::model::gguf::GgmlType, m: usize, shapes: &[(usize, usize, OutType)]) -> Result<(), CudaError> {
    use crate::cuda::gemm::{mmq_linear, mmq_runs, tiled_linear, GGML_TILE_ELEMENTS};
    let config = |e: crate::model::ModelError| CudaError::Config(e.to_string());
    let k0 = shapes.first().map_or(256, |s| s.1);
    let row_bytes = |k: usize| k / ty.block_size() * ty.type_size();
    // One pool of valid blocks, rows of `k0`: any whole number of K-quant or 32-value blocks in
    // it starts a valid matrix of any width.
    let pool_bytes = shapes.iter().map(|&(n, k, _)| n * row_bytes(k)).max().unwrap_or(0).max(256 << 20);
    let pool = dev.stream.clone_htod(&crate::model::sources::dummy_ggml_blocks(ty, pool_bytes.div_ceil(row_bytes(k0)), k0, 7).map_err(config)?)?;
    let bf16_pool_elements = shapes.iter().map(|&(n, k, _)| n * k).max().unwrap_or(0).max(128 << 20);
    let bf16_pool = dev.stream.clone_htod(&pseudo_random_bf16(bf16_pool_elements, 5))?;
    let tile = dev.stream.alloc_zeros::<bf16>(GGML_TILE_ELEMENTS)?;
    println!("{ty:?} products at m={m} (in a graph, weights cycled past L2; µs, GB/s of blocks):");
    println!("  {:>6} {:>6} {:>14} {:>14} {:>14} {:>14} {:>14}", "N", "K", "GEMV", "MMQ unsplit", "MMQ split", "tiles", "bf16 cuBLAS");
    let mut sums = [0.0f64; 5];
    let mut bytes_total = 0usize;
    for &(n, k, out_type) in shapes {
        let bytes = n * row_bytes(k);
        bytes_total += bytes;
        let x = dev.stream.clone_htod(&pseudo_random_bf16(m * k, 6))?;
        let out = dev.stream.alloc_zeros::<f32>(m * n)?;
        let copies = (pool_bytes / bytes).max(1);
        let launches = copies.max(16);
        let blocks = |i: usize| ptr(dev, &pool) + ((i % copies) * bytes) as u64;
        let tile_arg = (ptr(dev, &tile), GGML_TILE_ELEMENTS);
        let mut times: [Option<f64>; 5] = [None; 5];
        if gemv_supports(m, k, WeightFormat::Ggml(ty)) {
            times[0] = Some(graph_us(dev, launches, |i| unsafe {
                let w = GemvWeight::Ggml { ty, blocks: blocks(i) };
                gemv(dev, &Gemv { out: ptr(dev, &out), out_type, input: GemvInput::Plain(ptr(dev, &x)), w, bias: 0, m, k, n })
            })?);
        }
        if m > 1 && mmq_runs(dev, ty, m, k, GGML_TILE_ELEMENTS) {
            for (slot, blocks_wanted) in [(1, 1), (2, 2 * dev.num_sms)] {
                times[slot] = Some(graph_us(dev, launches, |i| unsafe { mmq_linear(dev, ptr(dev, &out), out_type, ptr(dev, &x), (ty, blocks(i)), tile_arg, m, k, n, blocks_wanted) })?);
            }
        }
        if m > 8 {
            times[3] = Some(graph_us(dev, launches, |i| unsafe { tiled_linear(dev, ptr(dev, &out), out_type, ptr(dev, &x), (ty, blocks(i)), tile_arg, m, k, n) })?);
        }
        let bf16_copies = (bf16_pool_elements / (n * k)).max(1);
        times[4] = Some(graph_us(dev, launches, |i| unsafe {
            cublas_linear(dev, ptr(dev, &out), out_type, ptr(dev, &x), ptr(dev, &bf16_pool) + ((i % bf16_copies) * n * k * 2) as u64, m, k, n)
        })?);
        let cell = |t: Option<f64>| t.map_or("-".to_string(), |us| format!("{us:.1} {:.0}", bytes as f64 / (us * 1e-6) / 1e9));
        println!("  {:>6} {:>6} {:>14} {:>14} {:>14} {:>14} {:>14}", n, k, cell(times[0]), cell(times[1]), cell(times[2]), cell(times[3]), cell(times[4]));
        for (sum, t) in sums.iter_mut().zip(times) {
            *sum += t.unwrap_or(f64::NAN);
        }
    }
    let cell = |us: f64| if us.is_nan() { "-".to_string() } else { format!("{us:.1} {:.0}", bytes_total as f64 / (us * 1e-6) / 1e9) };
    println!("  {:>13} {:>14} {:>14} {:>14} {:>14} {:>14}", "all", cell(sums[0]), cell(sums[1]), cell(sums[2]), cell(sums[3]), cell(sums[4]));
    Ok(())
}

/// Median milliseconds of one decode step of `batch` sequences at `context` positions each
/// (greedy tokens computed on the device; only they come back), through the captured CUDA graph
/// of its bucket when `graphs` (see `GpuBackend::capture_decode_graphs`), else kernel by kernel.
pub fn decode_step_ms(
    backend: &mut GpuBackend,
    batch: usize,
    context: usize,
    repeats: usize,
    graphs: bool,
) -> Result<f64, CudaError> {
    let fb = decode_batch(backend, batch, context)?;
    let dev = backend.model().device().clone();
    if graphs {
        return time_ms(&dev, 3, repeats, || {
            backend
                .decode_argmax_graph(&fb)
                .unwrap_or_else(|| Err(CudaError::Config("this batch has no captured graph".into())))
                .map(|_| ())
        });
    }
    time_ms(&dev, 3, repeats, || backend.forward_argmax(&fb).map(|_| ()))
}

/// The decode step through its graph without the attention kernels, then without the products
/// (`GpuBackend::omit_for_timing`), against the whole step `full_ms` of each batch: what each
/// costs inside the graph, seams included, a step and a layer. Recaptures the graphs (for
/// `max_batch` rows and `max_context` positions) and leaves whole ones captured.
pub fn print_graph_omissions(backend: &mut GpuBackend, full_ms: &[(usize, f64)], context: usize, max_batch: usize, max_context: usize) -> Result<(), CudaError> {
    use crate::cuda::Omit;
    let layers = backend.model().config().num_hidden_layers as f64;
    for omit in [Omit::Attention, Omit::Products] {
        backend.omit_for_timing(omit);
        backend.capture_decode_graphs(max_batch, max_context)?;
        for &(batch, full) in full_ms {
            let ms = decode_step_ms(backend, batch, context, 10, true)?;
            println!(
                "  graph step b{batch:<4} c{context:<5} without {omit:?}: {ms:>8.3} ms; {omit:?} in the graph {:>7.3} ms a step, {:>6.2} µs a layer",
                full - ms,
                (full - ms) * 1e3 / layers
            );
        }
    }
    backend.omit_for_timing(Omit::Nothing);
    backend.capture_decode_graphs(max_batch, max_context)?;
    Ok(())
}

/// The Llama-3.1-8B shape (for dummy weights).
pub fn llama_8b_config() -> ModelConfig {
    let mut c = ModelConfig::dense(crate::model::Arch::Llama, 4096, 14336, 32, 32, 8, 128, 128_256).expect("the 8B shape is within the limits");
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 500_000.0;
    c.rope_scaling = Some(crate::model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    c.max_position_embeddings = 131_072;
    c.bos_token_id = Some(128_000);
    c.eos_token_ids = vec![128_001, 128_009];
    c
}

/// The weight formats `llama_8b_backend` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DummyWeights {
    Bf16,
    /// Projections quantized to FP8 on the device.
    Fp8,
    /// Projections and head as random GGUF blocks of this type, kept quantized.
    Ggml(crate::model::gguf::GgmlType),
}

/// A dummy 8B model with a cache of `cache` values for `batch` sequences of `context` tokens,
/// its projections in `weights`.
pub fn llama_8b_backend(dev: &Arc<GpuDevice>, batch: usize, context: usize, weights: DummyWeights, cache: KvCacheDtype) -> Result<GpuBackend, CudaError> {
    let config = llama_8b_config();
    let source = crate::model::sources::DummySource::for_model(0, &config);
    let keep = match weights {
        DummyWeights::Ggml(ty) => Some(ty),
        _ => None,
    };
    let mut model = GpuModel::load_with(dev.clone(), config, &source, keep)?;
    if weights == DummyWeights::Fp8 {
        model.quantize_fp8()?;
    }
    GpuBackend::with_kv_cache(model, batch * context.div_ceil(16), 16, cache)
}

/// How a serving step picks its tokens, for `serving_step_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepSampling {
    /// The logits of every row copied to the host and sampled there (the native samplers).
    Host,
    /// Sampled on the device (`cuda::sampling`); only tokens come back.
    Device,
}

/// Median milliseconds of one serving decode step of `batch` sequences at `context` positions:
/// forward (through the decode graphs if `graphs`, which must have been captured) and sampling
/// with `params` per row, on the host or on the device. Synchronised: the host work of
/// `StepSampling::Host` lies between the two events.
pub fn serving_step_ms(
    backend: &mut GpuBackend,
    batch: usize,
    context: usize,
    repeats: usize,
    graphs: bool,
    sampling: StepSampling,
    params: &crate::sampling::SamplingParams,
) -> Result<f64, CudaError> {
    use crate::sampling::{sample_rows_host, RowSampling, SequenceSampler};
    let fb = decode_batch(backend, batch, context)?;
    backend.set_graphs_enabled(graphs);
    let vocab = backend.model().config().vocab_size;
    let mut samplers: Vec<SequenceSampler> = (0..batch).map(|i| SequenceSampler::new(params.clone(), &[], i as u64)).collect();
    let dev = backend.model().device().clone();
    let ms = time_ms(&dev, 3, repeats, || {
        let mut rows: Vec<RowSampling> =
            samplers.iter_mut().enumerate().map(|(row, sampler)| RowSampling { row, sampler, candidates: None }).collect();
        match sampling {
            StepSampling::Host => {
                let logits = backend.forward_logits_via_graphs(&fb)?;
                sample_rows_host(&logits, vocab, &mut rows);
            }
            StepSampling::Device => {
                backend.forward_and_sample(&fb, &mut rows)?;
            }
        }
        Ok(())
    });
    backend.set_graphs_enabled(true);
    ms
}
