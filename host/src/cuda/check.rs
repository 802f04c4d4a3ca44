//! `pagedserve check --device cuda`: the GPU path judged against the CPU path, on the machine
//! where it runs, with nothing but the binary. Each kernel is compared with its CPU counterpart on
//! fresh random inputs (relative error ‖gpu − cpu‖ / ‖cpu‖, inputs rounded to bfloat16 first so
//! only the arithmetic differs), then the whole forward (logits of a mixed batch) and greedy
//! tokens of the reference prompts. Prints a table; the caller exits non-zero on any failure.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::launch::row_threads;
use super::{CudaError, GpuBackend, GpuDevice, GpuModel, StandaloneAttention};
use crate::kv_cache::KvCacheLayout;
use crate::model::cpu::{ops, paged_attention, CpuKvCache, CpuModel};
use crate::runner::generate::{GenerateOptions, Generator};
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};

/// bfloat16's tolerance for one kernel's relative error.
pub const TOLERANCE: f64 = 1e-2;

/// Tolerance for the logits of the whole bfloat16 forward (see `check_forward`).
pub const FORWARD_TOLERANCE: f64 = 3e-2;

#[derive(Debug, Clone)]
pub struct CheckRow {
    pub name: String,
    pub detail: String,
    /// Relative error, or `None` for a pass/fail check.
    pub error: Option<f64>,
    pub passed: bool,
}

impl CheckRow {
    fn error(name: &str, detail: String, error: f64) -> Self {
        CheckRow { name: name.into(), detail, error: Some(error), passed: error.is_finite() && error < TOLERANCE }
    }
}

pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn random_bf16_values(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32()).collect()
}

fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn download_bf16(dev: &GpuDevice, slice: &CudaSlice<bf16>, n: usize) -> Result<Vec<f32>, CudaError> {
    let mut host = vec![bf16::ZERO; n];
    dev.stream.memcpy_dtoh(&slice.slice(..n), &mut host)?;
    Ok(host.iter().map(|v| v.to_f32()).collect())
}

/// Paged attention for sequences of `seq_lens` tokens, every token a query (prefill and decode at
/// once), keys and values in scattered blocks.
pub fn check_attention(
    dev: &GpuDevice,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seq_lens: &[usize],
    splits: usize,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let mut rng = StdRng::seed_from_u64(seed);
    let total_blocks: usize = seq_lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>() + 7;
    let layout = KvCacheLayout { num_layers: 1, num_blocks: total_blocks, block_size, num_kv_heads: kv_heads, head_dim };
    // Scattered, out-of-order blocks: a fixed permutation of the pool.
    let mut pool: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.random_range(0..=i));
    }
    let mut batch = ForwardBatch::new(block_size, total_blocks);
    let mut next = 0;
    for &len in seq_lens {
        let blocks = &pool[next..next + len.div_ceil(block_size)];
        next += blocks.len();
        batch.push_seq(&vec![0; len], 0, blocks, false).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    let n = batch.num_tokens();
    let q = random_bf16_values(&mut rng, n * heads * head_dim, 1.0);
    let k = random_bf16_values(&mut rng, n * kv_heads * head_dim, 1.0);
    let v = random_bf16_values(&mut rng, n * kv_heads * head_dim, 1.0);

    let mut cpu_cache = CpuKvCache::new(layout);
    let row = kv_heads * head_dim;
    for t in 0..n {
        cpu_cache.write(0, batch.slot_mapping[t] as usize, &k[t * row..][..row], &v[t * row..][..row]);
    }
    let (keys, values) = cpu_cache.layer(0);
    let mut want = vec![0.0f32; n * heads * head_dim];
    paged_attention(&mut want, &q, &batch, keys, values, &layout, heads, 1.0 / (head_dim as f32).sqrt());

    let attention = StandaloneAttention::upload(dev, &batch, &to_bf16(&q), &to_bf16(keys), &to_bf16(values), heads, kv_heads, head_dim, splits)?;
    attention.launch(dev)?;
    let got = attention.output(dev)?;
    Ok(CheckRow::error(
        "paged_attention",
        format!("heads {heads}/{kv_heads} hd {head_dim} lens {seq_lens:?} splits {splits}"),
        relative_error(&got, &want),
    ))
}

/// RMSNorm with the fused residual add, on `tokens` rows of width `hidden`.
pub fn check_rmsnorm(dev: &GpuDevice, tokens: usize, hidden: usize, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, tokens * hidden, 2.0);
    let delta = random_bf16_values(&mut rng, tokens * hidden, 2.0);
    let weight = random_bf16_values(&mut rng, hidden, 1.5);
    let mut want = vec![0.0f32; tokens * hidden];
    let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
    for (out, row) in want.chunks_exact_mut(hidden).zip(summed.chunks_exact(hidden)) {
        ops::rms_norm(out, row, &weight, 1e-5);
    }
    let stream = &dev.stream;
    let x_dev = stream.clone_htod(&x)?;
    let delta_dev = stream.clone_htod(&to_bf16(&delta))?;
    let w_dev = stream.clone_htod(&weight)?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; tokens * hidden])?;
    let (hidden_i, eps) = (hidden as i32, 1e-5f32);
    unsafe {
        stream
            .launch_builder(dev.function("fused_add_rmsnorm"))
            .arg(&x_dev)
            .arg(&delta_dev)
            .arg(&w_dev)
            .arg(&out_dev)
            .arg(&hidden_i)
            .arg(&eps)
            .launch(LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (row_threads(hidden), 1, 1), shared_mem_bytes: 0 })?;
    }
    let got = download_bf16(dev, &out_dev, tokens * hidden)?;
    Ok(CheckRow::error("fused_add_rmsnorm", format!("{tokens} x {hidden}"), relative_error(&got, &want)))
}

/// SiLU-and-multiply on `tokens` rows of `inter` outputs.
pub fn check_silu(dev: &GpuDevice, tokens: usize, inter: usize, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gate_up = random_bf16_values(&mut rng, tokens * 2 * inter, 4.0);
    let mut want = vec![0.0f32; tokens * inter];
    for (out, row) in want.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
        ops::silu_mul(out, row);
    }
    let stream = &dev.stream;
    let in_dev = stream.clone_htod(&to_bf16(&gate_up))?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; tokens * inter])?;
    let inter_i = inter as i32;
    unsafe {
        stream
            .launch_builder(dev.function("silu_and_mul"))
            .arg(&out_dev)
            .arg(&in_dev)
            .arg(&inter_i)
            .launch(LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (row_threads(inter), 1, 1), shared_mem_bytes: 0 })?;
    }
    let got = download_bf16(dev, &out_dev, tokens * inter)?;
    Ok(CheckRow::error("silu_and_mul", format!("{tokens} x {inter}"), relative_error(&got, &want)))
}

/// The whole forward: logits of a mixed batch (prefills of several prompts, then a step where
/// they decode while another prefills), GPU bfloat16 against the CPU path twice: with the weights
/// rounded to bfloat16 and with the float32 weights. Tolerance `FORWARD_TOLERANCE`: each kernel
/// stays near 2e-3, but the activations are rounded to bfloat16 before every matrix product, and
/// over 30 layers that compounds to about 1e-2 of the logits (seen on SmolLM2-135M, H100).
pub fn check_forward(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>]) -> Result<Vec<CheckRow>, CudaError> {
    let block_size = 16;
    let blocks_per_seq = prompts.iter().map(|p| p.len() + 4).max().unwrap_or(1).div_ceil(block_size);
    let num_blocks = blocks_per_seq * prompts.len();
    let rounded = CpuModel::new(
        cpu_model.config().clone(),
        cpu_model.weights().map_matrices(|v| bf16::from_f32(v).to_f32()),
    );
    let mut references = [
        ("forward vs bf16 CPU", CpuBackend::new(rounded, num_blocks, block_size), FORWARD_TOLERANCE),
        ("forward vs f32 CPU", CpuBackend::new(cpu_model.clone(), num_blocks, block_size), FORWARD_TOLERANCE),
    ];
    let mut gpu = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size)?;
    let table = |i: usize| -> Vec<u32> { ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect() };
    let config_err = |e: String| CudaError::Config(e);
    // Step 1: every prompt but the last prefills.
    let mut first = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate().take(prompts.len() - 1) {
        first.push_seq(p, 0, &table(i), true).map_err(|e| config_err(e.to_string()))?;
    }
    let got_first = gpu.forward_logits(&first)?;
    // Step 2: they decode one token each (the GPU's choice) while the last prompt prefills.
    let vocab = cpu_model.config().vocab_size;
    let mut second = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate().take(prompts.len() - 1) {
        let next = crate::sampling::argmax(&got_first[i * vocab..(i + 1) * vocab]) as u32;
        second.push_seq(&[next], p.len(), &table(i), true).map_err(|e| config_err(e.to_string()))?;
    }
    let last = prompts.len() - 1;
    second.push_seq(&prompts[last], 0, &table(last), true).map_err(|e| config_err(e.to_string()))?;
    let got_second = gpu.forward_logits(&second)?;
    let mut rows = Vec::new();
    for (name, cpu, tolerance) in references.iter_mut() {
        for (label, batch, got) in [("prefill", &first, &got_first), ("decode + prefill", &second, &got_second)] {
            let want = cpu.forward(batch).map_err(|e| config_err(e.to_string()))?;
            let error = relative_error(got, &want);
            rows.push(CheckRow {
                name: name.to_string(),
                detail: format!("{label}, {} sequences", batch.seqs.len()),
                error: Some(error),
                passed: error < *tolerance,
            });
        }
    }
    Ok(rows)
}

/// Greedy continuations on the GPU against expected token ids (from the reference file, or from
/// the CPU path). A divergence passes only right after a step whose recorded top-1/top-2 margin
/// is under `near_tie`.
pub fn check_greedy(
    dev: &Arc<GpuDevice>,
    cpu_model: &CpuModel,
    prompt: &[u32],
    expected: &[u32],
    margins: Option<&[f64]>,
    near_tie: f64,
) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let blocks = (prompt.len() + expected.len()).div_ceil(block_size) + 1;
    let gpu = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, blocks, block_size)?;
    let mut generator = Generator::with_backend(gpu);
    let options = GenerateOptions { max_new_tokens: expected.len(), stop_token_ids: Vec::new(), prefill_chunk: None };
    let got = generator
        .generate(&[prompt.to_vec()], &options, |_, _| {})
        .map_err(|e| CudaError::Config(e.to_string()))?
        .remove(0);
    let first_diff = got.iter().zip(expected).position(|(a, b)| a != b);
    let (passed, detail) = match first_diff {
        None => (true, format!("{} tokens identical", expected.len())),
        Some(i) => {
            let margin = margins.and_then(|m| m.get(i)).copied();
            let ok = margin.is_some_and(|m| m < near_tie);
            (ok, format!("diverges at token {i} (margin {margin:?}): got {:?} want {:?}", &got[i..], &expected[i..]))
        }
    };
    Ok(CheckRow { name: "greedy".into(), detail, error: None, passed })
}

/// Prints the table; returns whether every row passed.
pub fn print_table(rows: &[CheckRow]) -> bool {
    println!("{:<20} {:>12} {:>6}  detail", "check", "rel. error", "ok");
    for r in rows {
        let error = r.error.map_or("-".to_string(), |e| format!("{e:.2e}"));
        println!("{:<20} {:>12} {:>6}  {}", r.name, error, if r.passed { "yes" } else { "NO" }, r.detail);
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    println!("{} passed, {} failed", rows.len() - failed, failed);
    failed == 0
}

/// The standard set of kernel checks: odd sizes, one block, many blocks, GQA groups 1, 3 and 4,
/// head dims 64 and 128, with and without split-K.
pub fn kernel_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    let mut seed = 1;
    for (heads, kv_heads, head_dim) in [(4, 4, 64), (9, 3, 64), (32, 8, 128), (12, 4, 128), (14, 2, 64)] {
        for lens in [&[1usize][..], &[16], &[37, 5], &[300, 1, 129]] {
            seed += 1;
            rows.push(check_attention(dev, heads, kv_heads, head_dim, lens, 1, seed)?);
        }
    }
    // Split-K over long contexts.
    rows.push(check_attention(dev, 32, 8, 128, &[1500, 700], 3, 91)?);
    rows.push(check_attention(dev, 9, 3, 64, &[1100], 3, 92)?);
    rows.push(check_rmsnorm(dev, 7, 576, 3)?);
    rows.push(check_rmsnorm(dev, 3, 4096, 4)?);
    rows.push(check_silu(dev, 5, 1536, 5)?);
    rows.push(check_silu(dev, 2, 14336, 6)?);
    Ok(rows)
}

/// Decode steps through captured CUDA graphs against the same steps launched kernel by kernel:
/// three sequences prefill, then decode `steps` tokens; each step runs eagerly and through its
/// bucket's graph (padded from 3 to 4 rows) on the same cache state, and the tokens must agree.
pub fn check_graphs(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>], steps: usize) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let prompts = &prompts[..prompts.len().min(3)];
    let blocks_per_seq = (prompts.iter().map(Vec::len).max().unwrap_or(1) + steps + 1).div_ceil(block_size);
    let num_blocks = blocks_per_seq * prompts.len();
    let mut gpu = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size)?;
    let captured = gpu.capture_decode_graphs(prompts.len(), blocks_per_seq * block_size)?;
    let table = |i: usize| -> Vec<u32> { ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect() };
    let mut prefill = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate() {
        prefill.push_seq(p, 0, &table(i), true).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    let mut next = gpu.forward_argmax(&prefill)?;
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let (mut agreed, mut total) = (0, 0);
    for _ in 0..steps {
        let mut batch = ForwardBatch::new(block_size, num_blocks);
        for (i, &token) in next.iter().enumerate() {
            batch.push_seq(&[token], lens[i], &table(i), true).map_err(|e| CudaError::Config(e.to_string()))?;
        }
        let eager = gpu.forward_argmax(&batch)?;
        let graphed = gpu
            .decode_argmax_graph(&batch)
            .unwrap_or_else(|| Err(CudaError::Config("the decode batch found no graph".into())))?;
        total += eager.len();
        agreed += eager.iter().zip(&graphed).filter(|(a, b)| a == b).count();
        next = graphed;
        for l in lens.iter_mut() {
            *l += 1;
        }
    }
    Ok(CheckRow {
        name: "cuda graphs".into(),
        detail: format!("{captured} graphs captured; {agreed} of {total} decode tokens equal to eager launches"),
        error: None,
        passed: agreed == total,
    })
}
