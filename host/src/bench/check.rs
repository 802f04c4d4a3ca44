//! `pagedserve check --device cuda`: the GPU path judged against the CPU path, on the machine
//! where it runs, with nothing but the binary. Each kernel is compared with its CPU counterpart on
//! fresh random inputs (relative error ‖gpu − cpu‖ / ‖cpu‖, inputs rounded to bfloat16 first so
//! only the arithmetic differs), then the whole forward (logits of a mixed batch, and of decode
//! steps at batch 1–8 through the fused GEMV path) and greedy tokens of the reference prompts. Prints a table; the caller exits non-zero on any failure.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cuda::gemm::{linear, OutType};
use crate::cuda::gemv::{gemv, Gemv, GemvInput};
use crate::cuda::launch::{
    gated_config, gemv_prefers, moe_gemm_config, moe_most_tiles, moe_route_config, norm_config, row_threads, AttentionPath,
    AttentionSplit, WeightFormat, GEMV_MAX_ROWS, MOE_GROUP_CONFIG,
};
use crate::cuda::weights::{GpuMatrix, MatrixData};
use crate::cuda::{launchers, ptr};
use crate::cuda::{CudaError, GpuBackend, GpuDevice, GpuModel, StandaloneAttention};
use crate::kv_cache::{KvCacheDtype, KvCacheLayout};
use crate::model::config::LayerAttention;
use crate::model::cpu::{ops, paged_attention, AttentionShape, CpuKvCache, CpuModel};
use crate::model::fp8::Fp8Matrix;
use crate::model::rope::Rope;
use crate::runner::generate::{GenerateOptions, Generator};
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, Sampled, SampledRow, SamplingParams, SequenceSampler};
use crate::cuda::sampling::{sample_on_device, SamplingBuffers};

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
    pub(crate) fn error(name: &str, detail: String, error: f64) -> Self {
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

pub(crate) fn random_bf16_values(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

pub(crate) fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

pub(crate) fn download_bf16(
    dev: &GpuDevice,
    slice: &CudaSlice<bf16>,
    n: usize,
) -> Result<Vec<f32>, CudaError> {
    let mut host = vec![bf16::ZERO; n];
    dev.stream.memcpy_dtoh(&slice.slice(..n), &mut host)?;
    Ok(host.iter().map(|v| v.to_f32()).collect())
}

/// A batch of sequences given as `(cached, new)` over cache blocks of `block_size` positions,
/// scattered and out of order (a fixed permutation of a pool with `spare` blocks more than they
/// need), and the one-layer cache layout it indexes.
fn scattered_batch(
    rng: &mut StdRng,
    block_size: usize,
    seqs: &[(usize, usize)],
    spare: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(ForwardBatch, KvCacheLayout), CudaError> {
    let total_blocks: usize = seqs.iter().map(|(cached, new)| (cached + new).div_ceil(block_size)).sum::<usize>() + spare;
    let layout = KvCacheLayout { num_layers: 1, num_blocks: total_blocks, block_size, num_kv_heads: kv_heads, head_dim };
    let mut pool: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.random_range(0..=i));
    }
    let mut batch = ForwardBatch::new(block_size, total_blocks);
    let mut next = 0;
    for &(cached, new) in seqs {
        let blocks = &pool[next..next + (cached + new).div_ceil(block_size)];
        next += blocks.len();
        batch.push_seq(&vec![0; new], cached, blocks, false).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    Ok((batch, layout))
}

/// A one-layer cache of `dtype` with random keys and values in every slot, so a read of the wrong
/// slot (or a write that never happened) cannot go unnoticed.
fn random_cache(rng: &mut StdRng, layout: KvCacheLayout, dtype: KvCacheDtype) -> CpuKvCache {
    let mut cache = CpuKvCache::with_dtype(layout, dtype);
    let row = layout.num_kv_heads * layout.head_dim;
    for slot in 0..layout.num_blocks * layout.block_size {
        let k = random_bf16_values(rng, row, 1.0);
        let v = random_bf16_values(rng, row, 1.0);
        cache.write(0, slot, &k, &v);
    }
    cache
}

/// Attention for sequences given as `(cached, new)`: `cached` positions already in the cache (a
/// prefix-cache hit, or the chunks before a chunked prefill's current one) and `new` query tokens
/// after them, whose keys are in the cache too (as `rope_and_cache` leaves them). Every slot of
/// the pool holds random keys and values, so a read of the wrong slot cannot go unnoticed; block
/// tables are scattered and out of order. `path` picks which kernel takes which tokens (see
/// `AttentionPath`); `splits` is the decode kernel's split-K.
#[allow(clippy::too_many_arguments)]
pub fn check_attention(
    dev: &GpuDevice,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: &[(usize, usize)],
    path: AttentionPath,
    splits: usize,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    check_attention_over(dev, KvCacheDtype::Auto, 16, heads, kv_heads, head_dim, seqs, path, splits, 0, seed)
}

/// A row saying the attention of `head_dim` over `cache` was not run because its kernels need
/// more shared memory than a block may take on this device (head dim 256 on sm_86 and sm_89,
/// whose models the backend refuses), or None when it fits.
fn skipped_attention(dev: &GpuDevice, head_dim: usize, cache: KvCacheDtype) -> Option<CheckRow> {
    (!dev.attention_fits(head_dim, cache)).then(|| CheckRow {
        name: "attention".into(),
        detail: format!("hd {head_dim} over a {} cache skipped: more shared memory than {} allows a block", cache.name(), dev.arch),
        error: None,
        passed: true,
    })
}

/// `check_attention` over a cache of `cache` values with cache blocks of `block_size` positions
/// (`serve --block-size`), through a sliding window of `window` positions (0: none) as Mistral,
/// Phi-3 and Gemma 3's local layers attend. The CPU's `CpuKvCache` of that type holds the same
/// values the kernels read (an FP8 one, E4M3 bytes), so the rows measure the kernels, not the
/// format.
#[allow(clippy::too_many_arguments)]
pub fn check_attention_over(
    dev: &GpuDevice,
    cache: KvCacheDtype,
    block_size: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: &[(usize, usize)],
    path: AttentionPath,
    splits: usize,
    window: usize,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    if let Some(row) = skipped_attention(dev, head_dim, cache) {
        return Ok(row);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (batch, layout) = scattered_batch(&mut rng, block_size, seqs, 7, kv_heads, head_dim)?;
    let n = batch.num_tokens();
    let q = random_bf16_values(&mut rng, n * heads * head_dim, 1.0);
    let cpu_cache = random_cache(&mut rng, layout, cache);
    let (keys, values) = cpu_cache.layer(0);
    let mut want = vec![0.0f32; n * heads * head_dim];
    let shape = AttentionShape {
        num_heads: heads,
        q_stride: heads * head_dim,
        layer: LayerAttention { window: (window > 0).then_some(window), ..LayerAttention::full(head_dim) },
    };
    paged_attention(&mut want, &q, &batch, keys, values, &layout, &shape);

    let attention =
        StandaloneAttention::upload(dev, &batch, &to_bf16(&q), &keys.to_vec(), &values.to_vec(), cache, heads, kv_heads, head_dim, path, splits)?
            .with_window(window);
    attention.launch(dev)?;
    let got = attention.output(dev)?;
    let name = match (path, cache) {
        (AttentionPath::Decode, KvCacheDtype::Auto) => "paged_attention",
        (AttentionPath::Prefill, KvCacheDtype::Auto) => "prefill_attention",
        (AttentionPath::Mixed, KvCacheDtype::Auto) => "mixed attention",
        (AttentionPath::Decode, KvCacheDtype::Fp8E4M3) => "paged_attention fp8",
        (AttentionPath::Prefill, KvCacheDtype::Fp8E4M3) => "prefill_attn fp8",
        (AttentionPath::Mixed, KvCacheDtype::Fp8E4M3) => "mixed attn fp8",
    };
    let mut shown: Vec<String> =
        seqs.iter().map(|&(cached, new)| if cached == 0 { format!("{new}") } else { format!("{cached}+{new}") }).collect();
    if shown.len() > 6 && shown.iter().all(|s| *s == shown[0]) {
        shown = vec![format!("{} x {}", shown.len(), shown[0])];
    }
    let blocks = if block_size == 16 { String::new() } else { format!(" block {block_size}") };
    let windowed = if window == 0 { String::new() } else { format!(" window {window}") };
    Ok(CheckRow::error(
        name,
        format!("heads {heads}/{kv_heads} hd {head_dim} lens [{}] splits {splits}{blocks}{windowed}", shown.join(", ")),
        relative_error(&got, &want),
    ))
}

/// The decode kernel with RoPE and the cache write fused (`AttentionArgs::rope`), as decode-only
/// batches run it: each sequence has `cached` positions in a cache of random keys and values
/// (its own slot included, so a missing write cannot go unnoticed) and one new token, whose
/// unrotated QKV row the kernel reads. Against the CPU's `rope_and_cache` then `paged_attention`:
/// the worse of the output's and the whole cache's relative errors. The cache holds `cache`
/// values (an FP8 one: the kernel writes the rotated key's E4M3 bytes).
#[allow(clippy::too_many_arguments)]
pub fn check_fused_rope_attention(
    dev: &GpuDevice,
    cache: KvCacheDtype,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    magnitude: f32,
    cached: &[usize],
    splits: usize,
    window: usize,
    qkv_splits: usize,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    if let Some(row) = skipped_attention(dev, head_dim, cache) {
        return Ok(row);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let seqs: Vec<(usize, usize)> = cached.iter().map(|&c| (c, 1)).collect();
    let (batch, layout) = scattered_batch(&mut rng, 16, &seqs, 5, kv_heads, head_dim)?;
    let n = batch.num_tokens();
    let width = (heads + 2 * kv_heads) * head_dim;
    let qkv = random_bf16_values(&mut rng, n * width, 1.0);
    let mut cpu_cache = random_cache(&mut rng, layout, cache);
    let (keys_before, values_before) = {
        let (k, v) = cpu_cache.layer(0);
        (k.to_vec(), v.to_vec())
    };

    // CPU: rotate Q and K of each row, write K and V to the token's slot, then attend.
    let inv_freq = default_inv_freq(rotary_dim);
    let mut rotated = qkv.clone();
    for t in 0..n {
        let (mut cos, mut sin) = cos_sin(&inv_freq, batch.positions[t]);
        cos.iter_mut().chain(sin.iter_mut()).for_each(|v| *v *= magnitude);
        let row = &mut rotated[t * width..(t + 1) * width];
        let (qk, v) = row.split_at_mut((heads + kv_heads) * head_dim);
        Rope::apply(qk, head_dim, &cos, &sin);
        cpu_cache.write(0, batch.slot_mapping[t] as usize, &qk[heads * head_dim..], v);
    }
    let (keys, values) = cpu_cache.layer(0);
    let mut want = vec![0.0f32; n * heads * head_dim];
    let shape = AttentionShape {
        num_heads: heads,
        q_stride: width,
        layer: LayerAttention { window: (window > 0).then_some(window), ..LayerAttention::full(head_dim) },
    };
    paged_attention(&mut want, &rotated, &batch, keys, values, &layout, &shape);

    // With the QKV product in `qkv_splits` partials (random pieces, the last one what makes the
    // sum), the bf16 rows uploaded are NaN: the kernel must read the partials alone.
    let split_qkv = qkv_splits > 1;
    let uploaded = if split_qkv { vec![bf16::NAN; qkv.len()] } else { to_bf16(&qkv) };
    let mut attention =
        StandaloneAttention::upload(dev, &batch, &uploaded, &keys_before, &values_before, cache, heads, kv_heads, head_dim, AttentionPath::Decode, splits)?
            .with_window(window)
            .with_fused_rope(dev, &batch.slot_mapping, &inv_freq, rotary_dim, magnitude)?;
    if split_qkv {
        let mut partials: Vec<f32> = (0..(qkv_splits - 1) * qkv.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let last: Vec<f32> = qkv.iter().enumerate().map(|(i, &v)| (0..qkv_splits - 1).fold(v, |rest, s| rest - partials[s * qkv.len() + i])).collect();
        partials.extend(last);
        attention = attention.with_qkv_partials(dev, &partials, qkv_splits)?;
    }
    attention.launch(dev)?;
    let got = attention.output(dev)?;
    let (got_k, got_v) = attention.cache(dev)?;
    let cache_want: Vec<f32> = keys.to_vec().into_iter().chain(values.to_vec()).collect();
    let cache_got: Vec<f32> = got_k.into_iter().chain(got_v).collect();
    let error = relative_error(&got, &want).max(relative_error(&cache_got, &cache_want));
    let windowed = if window == 0 { String::new() } else { format!(" window {window}") };
    let windowed = if split_qkv { format!("{windowed} qkv in {qkv_splits} partials") } else { windowed };
    let shown: Vec<String> = cached.iter().map(|c| format!("{c}+1")).collect();
    Ok(CheckRow::error(
        if cache == KvCacheDtype::Auto { "paged_attention +rope" } else { "paged_attn +rope fp8" },
        format!("heads {heads}/{kv_heads} hd {head_dim} rotary {rotary_dim} x{magnitude} lens [{}] splits {splits}{windowed}", shown.join(", ")),
        error,
    ))
}

/// GPT-J-style ("interleaved") RoPE of every head of `x` in place: dimensions `2i` and `2i + 1`
/// rotate together by the angle of frequency `i`. The CPU model only has the rotate-half form
/// (`Rope::apply`); this is the reference for `rope_and_cache` with `interleaved = 1`.
pub fn rope_interleaved(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (x1, x2) = (pair[0], pair[1]);
            pair[0] = x1 * cos[i] - x2 * sin[i];
            pair[1] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// RoPE inverse frequencies with base 10000 (the form `Rope::new` computes, without scaling).
fn default_inv_freq(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0f32 / 10000f32.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// Cosines and sines of one position, as `Rope::cos_sin` computes them (float32 angle).
fn cos_sin(inv_freq: &[f32], position: u32) -> (Vec<f32>, Vec<f32>) {
    inv_freq.iter().map(|&f| ((position as f32 * f).cos(), (position as f32 * f).sin())).unzip()
}

/// `rope_and_cache` on `tokens` random rows at random positions (up to 8000, so large angles are
/// covered) and scattered slots, rotate-half or interleaved, over the first `rotary_dim`
/// dimensions of each head, cosines and sines times `magnitude`: the rotated Q and K in the QKV
/// buffer, and the K and V the cache (of `cache` values) received, against the CPU.
#[allow(clippy::too_many_arguments)]
pub fn check_rope(
    dev: &GpuDevice,
    cache: KvCacheDtype,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    magnitude: f32,
    interleaved: bool,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let mut rng = StdRng::seed_from_u64(seed);
    let width = (heads + 2 * kv_heads) * head_dim;
    let qkv = random_bf16_values(&mut rng, tokens * width, 2.0);
    let positions: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..8000)).collect();
    let num_blocks = tokens.div_ceil(block_size) + 3;
    let mut slots: Vec<u32> = (0..(num_blocks * block_size) as u32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.random_range(0..=i));
    }
    slots.truncate(tokens);
    let inv_freq = default_inv_freq(rotary_dim);

    // CPU: rotate Q and K of every row; the cache gets K (rotated) and V at the row's slot.
    let layout = KvCacheLayout { num_layers: 1, num_blocks, block_size, num_kv_heads: kv_heads, head_dim };
    let mut want_qkv = qkv.clone();
    let mut cpu_cache = CpuKvCache::with_dtype(layout, cache);
    for t in 0..tokens {
        let (mut cos, mut sin) = cos_sin(&inv_freq, positions[t]);
        cos.iter_mut().chain(sin.iter_mut()).for_each(|v| *v *= magnitude);
        let row = &mut want_qkv[t * width..(t + 1) * width];
        let (qk, v) = row.split_at_mut((heads + kv_heads) * head_dim);
        if interleaved {
            rope_interleaved(qk, head_dim, &cos, &sin);
        } else {
            Rope::apply(qk, head_dim, &cos, &sin);
        }
        cpu_cache.write(0, slots[t] as usize, &qk[heads * head_dim..], v);
    }

    let stream = &dev.stream;
    let qkv_dev = stream.clone_htod(&to_bf16(&qkv))?;
    let positions_dev = stream.clone_htod(&positions)?;
    let slots_dev = stream.clone_htod(&slots)?;
    let inv_freq_dev = stream.clone_htod(&inv_freq)?;
    let cache_bytes = layout.layer_len() * cache.bytes_per_value(2);
    let k_cache = stream.alloc_zeros::<u8>(cache_bytes)?;
    let v_cache = stream.alloc_zeros::<u8>(cache_bytes)?;
    let (heads_i, kv_heads_i, hd_i, bs_i) = (heads as i32, kv_heads as i32, head_dim as i32, block_size as i32);
    let (position_scale, interleaved_i) = (1.0f32, interleaved as i32);
    let config = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (row_threads((heads + kv_heads) * head_dim / 2), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every buffer was allocated above for `tokens` tokens and the cache layout.
    unsafe {
        launchers::rope_and_cache(
            dev,
            cache,
            config,
            ptr(dev, &qkv_dev),
            ptr(dev, &positions_dev),
            ptr(dev, &slots_dev),
            ptr(dev, &inv_freq_dev),
            ptr(dev, &k_cache),
            ptr(dev, &v_cache),
            heads_i,
            kv_heads_i,
            hd_i,
            bs_i,
            position_scale,
            interleaved_i,
            rotary_dim as i32,
            magnitude,
        )?;
    }
    let mut got = download_bf16(dev, &qkv_dev, tokens * width)?;
    for array in [&k_cache, &v_cache] {
        let bytes = stream.clone_dtoh(array)?;
        match cache {
            KvCacheDtype::Auto => got.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            KvCacheDtype::Fp8E4M3 => got.extend(bytes.iter().map(|&b| crate::model::fp8::e4m3_value(b))),
        }
    }
    let (keys, values) = cpu_cache.layer(0);
    want_qkv.extend(keys.to_vec());
    want_qkv.extend(values.to_vec());
    Ok(CheckRow::error(
        if cache == KvCacheDtype::Auto { "rope_and_cache" } else { "rope_and_cache fp8" },
        format!(
            "{} {tokens} x {heads}/{kv_heads} hd {head_dim} rotary {rotary_dim} x{magnitude}",
            if interleaved { "interleaved" } else { "rotate-half" }
        ),
        relative_error(&got, &want_qkv),
    ))
}

/// Row and column scales of an FP8 GEMM's output (`scaled`), or none: what `fused_add_rmsnorm`
/// and the gated activations fold in. Spread over about two orders of magnitude, as E4M3 scales
/// (max|x| / 448) of real rows are.
fn fp8_output_scales(rng: &mut StdRng, rows: usize, cols: usize, scaled: bool) -> Option<(Vec<f32>, Vec<f32>)> {
    let mut scales = |count: usize| (0..count).map(|_| 10f32.powf(rng.random_range(-3.0f32..-1.0))).collect::<Vec<f32>>();
    scaled.then(|| (scales(rows), scales(cols)))
}

/// `scales` on the device (kept alive by the caller) and their addresses, 0 and 0 for none: the
/// row and column scale arguments of the kernels that fold them in.
fn upload_output_scales(dev: &GpuDevice, scales: &Option<(Vec<f32>, Vec<f32>)>) -> Result<(Option<(CudaSlice<f32>, CudaSlice<f32>)>, (u64, u64)), CudaError> {
    let uploaded = scales.as_ref().map(|(r, c)| Ok::<_, CudaError>((dev.stream.clone_htod(r)?, dev.stream.clone_htod(c)?))).transpose()?;
    let ptrs = uploaded.as_ref().map_or((0, 0), |(r, c)| (ptr(dev, r), ptr(dev, c)));
    Ok((uploaded, ptrs))
}

/// `values[r, c] * rows[r] * cols[c]` of the bf16-rounded values: what a kernel given an FP8
/// GEMM's unscaled bf16 output and its scales computes.
fn apply_output_scales(values: &[f32], scales: &Option<(Vec<f32>, Vec<f32>)>) -> Vec<f32> {
    let rounded: Vec<f32> = values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    match scales {
        None => rounded,
        Some((rows, cols)) => rounded.chunks_exact(cols.len()).zip(rows).flat_map(|(row, rs)| row.iter().zip(cols).map(move |(v, cs)| v * (rs * cs))).collect(),
    }
}

/// RMSNorm with the fused residual add, on `tokens` rows of width `hidden`; with `scaled`, the
/// delta is an FP8 GEMM's unscaled output and the kernel applies its row and column scales.
pub fn check_rmsnorm(dev: &GpuDevice, tokens: usize, hidden: usize, scaled: bool, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, tokens * hidden, 2.0);
    let scales = fp8_output_scales(&mut rng, tokens, hidden, scaled);
    // Unscaled FP8 products are hundreds of times their scaled values.
    let delta = random_bf16_values(&mut rng, tokens * hidden, if scaled { 400.0 } else { 2.0 });
    let weight = random_bf16_values(&mut rng, hidden, 1.5);
    let mut want = vec![0.0f32; tokens * hidden];
    let summed: Vec<f32> = x.iter().zip(apply_output_scales(&delta, &scales)).map(|(a, b)| a + b).collect();
    for (out, row) in want.chunks_exact_mut(hidden).zip(summed.chunks_exact(hidden)) {
        ops::rms_norm(out, row, &weight, 1e-5);
    }
    let stream = &dev.stream;
    let x_dev = stream.clone_htod(&x)?;
    let delta_dev = stream.clone_htod(&to_bf16(&delta))?;
    let w_dev = stream.clone_htod(&weight)?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; tokens * hidden])?;
    let (_scales_dev, (row_scales, col_scales)) = upload_output_scales(dev, &scales)?;
    let (hidden_i, eps) = (hidden as i32, 1e-5f32);
    let config = norm_config(tokens, hidden);
    // SAFETY: every buffer was allocated above for `tokens` rows of `hidden` (the scales `tokens`
    // and `hidden`).
    unsafe {
        launchers::fused_add_rmsnorm(dev, config, ptr(dev, &x_dev), ptr(dev, &delta_dev), row_scales, col_scales, ptr(dev, &w_dev), ptr(dev, &out_dev), hidden_i, eps)?;
    }
    let got = download_bf16(dev, &out_dev, tokens * hidden)?;
    let name = if scaled { "fused_add_rmsnorm fp8 delta" } else { "fused_add_rmsnorm" };
    Ok(CheckRow::error(name, format!("{tokens} x {hidden}"), relative_error(&got, &want)))
}

/// SiLU-and-multiply on `tokens` rows of `inter` outputs; with `scaled`, of an FP8 GEMM's
/// unscaled output whose scales the kernel applies.
pub fn check_silu(dev: &GpuDevice, tokens: usize, inter: usize, scaled: bool, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scales = fp8_output_scales(&mut rng, tokens, 2 * inter, scaled);
    let gate_up = random_bf16_values(&mut rng, tokens * 2 * inter, if scaled { 800.0 } else { 4.0 });
    let mut want = vec![0.0f32; tokens * inter];
    for (out, row) in want.chunks_exact_mut(inter).zip(apply_output_scales(&gate_up, &scales).chunks_exact(2 * inter)) {
        ops::silu_mul(out, row);
    }
    let stream = &dev.stream;
    let in_dev = stream.clone_htod(&to_bf16(&gate_up))?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; tokens * inter])?;
    let (_scales_dev, (row_scales, col_scales)) = upload_output_scales(dev, &scales)?;
    let inter_i = inter as i32;
    let config = gated_config(tokens, inter);
    // SAFETY: every buffer was allocated above for `tokens` rows (the scales `tokens` and
    // `2 * inter`).
    unsafe { launchers::silu_and_mul(dev, config, ptr(dev, &out_dev), ptr(dev, &in_dev), row_scales, col_scales, inter_i)? };
    let got = download_bf16(dev, &out_dev, tokens * inter)?;
    let name = if scaled { "silu_and_mul fp8 input" } else { "silu_and_mul" };
    Ok(CheckRow::error(name, format!("{tokens} x {inter}"), relative_error(&got, &want)))
}

/// The whole forward: logits of a mixed batch (prefills of several prompts, then a step where
/// they decode while another prefills), GPU bfloat16 against the CPU path twice: with the weights
/// rounded to bfloat16 and with the float32 weights. Tolerance `FORWARD_TOLERANCE`: each kernel
/// stays near 2e-3, but the activations are rounded to bfloat16 before every matrix product, and
/// over 30 layers that compounds to about 1e-2 of the logits (seen on SmolLM2-135M, H100).
/// Every backend's cache holds `cache` values (an FP8 one: both sides round each key and value
/// to E4M3, the CPU from float32, the GPU from its bf16 activations).
pub fn check_forward(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>], cache: KvCacheDtype) -> Result<Vec<CheckRow>, CudaError> {
    let block_size = 16;
    let blocks_per_seq = prompts.iter().map(|p| p.len() + 4).max().unwrap_or(1).div_ceil(block_size);
    let num_blocks = blocks_per_seq * prompts.len();
    let rounded = cpu_model.map_matrices(|v| bf16::from_f32(v).to_f32());
    let (bf16_name, f32_name) = match cache {
        KvCacheDtype::Auto => ("forward vs bf16 CPU", "forward vs f32 CPU"),
        KvCacheDtype::Fp8E4M3 => ("fwd fp8 KV vs bf16 CPU", "fwd fp8 KV vs f32 CPU"),
    };
    // Each CPU reference over the same cache type, and (FP8 only) over an exact cache, whose
    // distance from it sets the row's tolerance (`fp8_cache_tolerance`).
    let exact = |model: &CpuModel| (cache == KvCacheDtype::Fp8E4M3).then(|| CpuBackend::new(model.clone(), num_blocks, block_size));
    let mut references = [
        (bf16_name, CpuBackend::with_kv_cache(rounded.clone(), num_blocks, block_size, cache), exact(&rounded)),
        (f32_name, CpuBackend::with_kv_cache(cpu_model.clone(), num_blocks, block_size, cache), exact(cpu_model)),
    ];
    let mut gpu = GpuBackend::with_kv_cache(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size, cache)?;
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
    for (name, cpu, exact) in references.iter_mut() {
        for (label, batch, got) in [("prefill", &first, &got_first), ("decode + prefill", &second, &got_second)] {
            let want = cpu.forward(batch).map_err(|e| config_err(e.to_string()))?;
            let (tolerance, shown) = match exact {
                Some(exact) => {
                    let tolerance = fp8_cache_tolerance(&want, &exact.forward(batch).map_err(|e| config_err(e.to_string()))?);
                    (tolerance, format!(" (tolerance {tolerance:.3})"))
                }
                None => (FORWARD_TOLERANCE, String::new()),
            };
            let error = relative_error(got, &want);
            rows.push(CheckRow {
                name: name.to_string(),
                detail: format!("{label}, {} sequences{shown}", batch.seqs.len()),
                error: Some(error),
                passed: error < tolerance,
            });
        }
    }
    Ok(rows)
}

/// The tolerance of a forward over an FP8 cache against the CPU's over one (`want`), given the
/// CPU's logits over an exact cache (`exact`). E4M3 rounding is fragile: a key that differs by
/// a bf16 rounding lands on the neighbouring E4M3 value now and then, 6-12% away. On the CPU
/// (default model, the four reference prompts' first step), the FP8 cache moves the logits by
/// 1.9-5.6% from the float32 cache's, and merely rounding each key and value to bf16 before
/// E4M3 moves them by 1.4-8.3%; the GPU's keys differ from the CPU's by more than that. So the
/// row asks that the GPU's FP8 forward be within twice the format's own distance, on top of the
/// bf16 tolerance: a kernel that reads the wrong bytes or dimensions lands near 1.
fn fp8_cache_tolerance(want: &[f32], exact: &[f32]) -> f64 {
    FORWARD_TOLERANCE + 2.0 * relative_error(want, exact)
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
    check_greedy_of(GpuModel::from_cpu(dev.clone(), cpu_model)?, prompt, expected, margins, near_tie)
}

/// As `check_greedy`, for a model already on the device (loaded straight from its file).
pub fn check_greedy_of(model: GpuModel, prompt: &[u32], expected: &[u32], margins: Option<&[f64]>, near_tie: f64) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let blocks = (prompt.len() + expected.len()).div_ceil(block_size) + 1;
    let gpu = GpuBackend::new(model, blocks, block_size)?;
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

/// `x[m×k] · w[n×k]ᵀ (+ bias)` in float64 (the reference of the GEMV checks).
pub(crate) fn matmul_reference(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let dot: f64 = x[r * k..(r + 1) * k].iter().zip(&w[j * k..(j + 1) * k]).map(|(&a, &b)| a as f64 * b as f64).sum();
            out[r * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    out
}

/// A random-valued `[n, k]` weight (bf16 values) on the device in `format` (FP8 quantized there,
/// by the kernel under test too), and the values its products read, for the CPU reference.
pub(crate) fn device_weight(
    dev: &GpuDevice,
    w: &[f32],
    n: usize,
    k: usize,
    format: WeightFormat,
) -> Result<(GpuMatrix, Vec<f32>), CudaError> {
    let mut matrix = GpuMatrix { rows: n, cols: k, data: MatrixData::Bf16(dev.stream.clone_htod(&to_bf16(w))?), bias: None };
    let values = match format {
        WeightFormat::Bf16 => w.to_vec(),
        WeightFormat::Ggml(ty) => {
            // Random blocks (`w` only seeds them), uploaded as stored; the reference reads the
            // CPU's dequantization of the same bytes.
            let seed = w.first().map_or(0, |v| u64::from(v.to_bits()));
            let config_err = |e: crate::model::ModelError| CudaError::Config(e.to_string());
            let blocks = crate::model::sources::dummy_ggml_blocks(ty, n, k, seed).map_err(config_err)?;
            let mut values = vec![0.0f32; n * k];
            crate::model::gguf::dequantize(ty, &blocks, n * k, &mut values).map_err(|e| CudaError::Config(e.to_string()))?;
            matrix.data = MatrixData::Ggml { ty, blocks: dev.stream.clone_htod(&blocks)? };
            values
        }
        WeightFormat::Fp8 => {
            matrix.quantize_fp8(dev)?;
            Fp8Matrix::quantize(w, n, k).map_err(|e| CudaError::Config(e.to_string()))?.dequantize()
        }
    };
    Ok((matrix, values))
}

/// The input values a GEMV of `format` multiplies, from the staged (bf16-rounded) ones: from
/// GGUF blocks, each 32 values quantized to int8 with the scale amax / 127 and back, as
/// `stage_q8` in `kernels/ggml.cu` computes them (its min terms use the sums of these values too),
/// so the check measures the kernel, not the quantization; the values themselves otherwise.
pub(crate) fn as_read_by(format: WeightFormat, values: &mut [f32]) {
    if !matches!(format, WeightFormat::Ggml(_)) {
        return;
    }
    for group in values.chunks_mut(32) {
        let amax = group.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let (d, inv_d) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
        for v in group {
            *v = (*v * inv_d).round_ties_even() * d;
        }
    }
}

/// A GEMV's name in the check table: "gemv", "fp8 gemv", "q4_k gemv", ...
pub(crate) fn gemv_label(format: WeightFormat) -> String {
    match format {
        WeightFormat::Bf16 => "gemv".into(),
        WeightFormat::Fp8 => "fp8 gemv".into(),
        WeightFormat::Ggml(ty) => format!("{ty:?} gemv").to_lowercase(),
    }
}

pub(crate) fn round_bf16(values: &mut [f32]) {
    for v in values {
        *v = bf16::from_f32(*v).to_f32();
    }
}

/// `linear` at small M against the CPU product: the GEMV where it takes the shape, cuBLAS where
/// it does not (k not a multiple of 8); bf16 or float32 out, the output poisoned first.
pub fn check_gemv(dev: &GpuDevice, m: usize, n: usize, k: usize, out_type: OutType, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, m * k, 1.0);
    let w = random_bf16_values(&mut rng, n * k, 0.1);
    let want = matmul_reference(&x, &w, None, m, k, n);
    let stream = &dev.stream;
    let (x_dev, w_dev) = (stream.clone_htod(&to_bf16(&x))?, stream.clone_htod(&to_bf16(&w))?);
    let got = match out_type {
        OutType::Bf16 => {
            let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
            unsafe { linear(dev, ptr(dev, &out), out_type, ptr(dev, &x_dev), ptr(dev, &w_dev), m, k, n)? };
            download_bf16(dev, &out, m * n)?
        }
        OutType::F32 => {
            let out = stream.clone_htod(&vec![f32::NAN; m * n])?;
            unsafe { linear(dev, ptr(dev, &out), out_type, ptr(dev, &x_dev), ptr(dev, &w_dev), m, k, n)? };
            stream.clone_dtoh(&out)?
        }
    };
    let path = if gemv_prefers(m, k, n, WeightFormat::Bf16) {
        "gemv"
    } else if crate::cuda::skinny::prefers(dev, m, k, n) {
        "skinny"
    } else {
        "cuBLAS"
    };
    Ok(CheckRow::error("linear small-M", format!("{path} m {m} n {n} k {k} {out_type:?} out"), relative_error(&got, &want)))
}

/// A product split over K (`gemm::split_k_partials`, `splits` slices into float32 partials) against
/// the CPU product, two ways: its partials summed by `sum_partials_bf16` (what a consumer that does
/// not take the pieces gets), and folded into the residual add and norm after it
/// (`fused_add_rmsnorm_partials`: the residual it leaves and the normalised rows). Outputs poisoned
/// first.
pub fn check_split_k(dev: &GpuDevice, m: usize, n: usize, k: usize, splits: usize, seed: u64) -> Result<Vec<CheckRow>, CudaError> {
    use crate::cuda::gemm::split_k_partials;
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, m * k, 1.0);
    let w = random_bf16_values(&mut rng, n * k, 0.1);
    let residual: Vec<f32> = (0..m * n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    let norm_weight = random_bf16_values(&mut rng, n, 1.5);
    let product = matmul_reference(&x, &w, None, m, k, n);
    let want_residual: Vec<f32> = residual.iter().zip(&product).map(|(a, b)| a + b).collect();
    let mut want_out = vec![0.0f32; m * n];
    for (out, row) in want_out.chunks_exact_mut(n).zip(want_residual.chunks_exact(n)) {
        ops::rms_norm(out, row, &norm_weight, 1e-5);
    }
    let stream = &dev.stream;
    let (x_dev, w_dev) = (stream.clone_htod(&to_bf16(&x))?, stream.clone_htod(&to_bf16(&w))?);
    let partials = stream.clone_htod(&vec![f32::NAN; splits * m * n])?;
    let summed = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let residual_dev = stream.clone_htod(&residual)?;
    let norm_weight_dev = stream.clone_htod(&norm_weight)?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let stride = (m * n) as u64;
    // SAFETY: every buffer was allocated above at the sizes the calls read and write.
    unsafe {
        split_k_partials(dev, ptr(dev, &partials), ptr(dev, &x_dev), ptr(dev, &w_dev), m, k, n, splits)?;
        launchers::sum_partials_bf16(dev, crate::cuda::launch::grid_stride_config(m * n), ptr(dev, &summed), ptr(dev, &partials), splits as i32, stride, stride)?;
        launchers::fused_add_rmsnorm_partials(
            dev,
            norm_config(m, n),
            ptr(dev, &residual_dev),
            ptr(dev, &partials),
            splits as i32,
            stride,
            ptr(dev, &norm_weight_dev),
            ptr(dev, &out),
            n as i32,
            1e-5,
        )?;
    }
    let detail = format!("m {m} n {n} k {k}, {splits} slices");
    Ok(vec![
        CheckRow::error("split-K product, summed", detail.clone(), relative_error(&download_bf16(dev, &summed, m * n)?, &product)),
        CheckRow::error("split-K +add+norm residual", detail.clone(), relative_error(&stream.clone_dtoh(&residual_dev)?, &want_residual)),
        CheckRow::error("split-K +add+norm", detail, relative_error(&download_bf16(dev, &out, m * n)?, &want_out)),
    ])
}

/// The GEMV with SiLU-and-multiply folded into its input against the unfused composition
/// (`silu_and_mul`, rounded to bf16, then the product) on the CPU.
pub fn check_gemv_silu(
    dev: &GpuDevice,
    m: usize,
    n: usize,
    inter: usize,
    format: WeightFormat,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gate_up = random_bf16_values(&mut rng, m * 2 * inter, 4.0);
    let w = random_bf16_values(&mut rng, n * inter, 0.1);
    let mut act = vec![0.0f32; m * inter];
    for (out, row) in act.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
        ops::silu_mul(out, row);
    }
    round_bf16(&mut act);
    as_read_by(format, &mut act);
    let (w_dev, w) = device_weight(dev, &w, n, inter, format)?;
    let want = matmul_reference(&act, &w, None, m, inter, n);
    let stream = &dev.stream;
    let in_dev = stream.clone_htod(&to_bf16(&gate_up))?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    // Past the GEMV's rows the forward folds the activation into the skinny kernel's staging
    // where that kernel is on (`PAGEDSERVE_SKINNY`), and otherwise runs `silu_and_mul`, then
    // the product (cuBLAS): the row checks the path the forward takes.
    let past_gemv = format == WeightFormat::Bf16 && m > GEMV_MAX_ROWS;
    let skinny = past_gemv && crate::cuda::skinny::prefers(dev, m, inter, n);
    let label = if skinny {
        let (input, weight) = (crate::cuda::skinny::SkinnyInput::SiluMul(ptr(dev, &in_dev)), w_dev.weight(dev));
        let crate::cuda::gemv::GemvWeight::Bf16(weight) = weight else { unreachable!("a bf16 matrix") };
        unsafe { crate::cuda::skinny::skinny_linear(dev, ptr(dev, &out), OutType::Bf16, input, weight, m, inter, n)? };
        "skinny".to_string()
    } else if past_gemv {
        let crate::cuda::gemv::GemvWeight::Bf16(weight) = w_dev.weight(dev) else { unreachable!("a bf16 matrix") };
        let act_dev = stream.clone_htod(&vec![bf16::NAN; m * inter])?;
        // SAFETY: gate_up holds `m` rows of `2 * inter`, act `m` rows of `inter`, the weight `n` of `inter`.
        unsafe {
            launchers::silu_and_mul(dev, gated_config(m, inter), ptr(dev, &act_dev), ptr(dev, &in_dev), 0, 0, inter as i32)?;
            linear(dev, ptr(dev, &out), OutType::Bf16, ptr(dev, &act_dev), weight, m, inter, n)?;
        }
        "silu_and_mul, cuBLAS".to_string()
    } else {
        let g = Gemv {
            out: ptr(dev, &out),
            out_type: OutType::Bf16,
            input: GemvInput::SiluMul(ptr(dev, &in_dev)),
            w: w_dev.weight(dev),
            bias: 0,
            m,
            k: inter,
            n,
        };
        unsafe { gemv(dev, &g)? };
        gemv_label(format)
    };
    let got = download_bf16(dev, &out, m * n)?;
    Ok(CheckRow::error(&format!("{label} +silu"), format!("m {m} n {n} k {inter}"), relative_error(&got, &want)))
}

/// The GEMV at one row with the merge of a split decode attention's partials folded into its
/// input (`GemvInput::Merge`) against the unfused composition on the CPU: the partials merged as
/// `attention_reduce` merges them (each head's splits weighted by exp2(max − overall max)),
/// rounded to bf16, then the product. The last `empty` splits have no keys (maximum −inf, sum 0,
/// zero rows), as a graph planned for a longer context leaves them.
#[allow(clippy::too_many_arguments)]
pub fn check_gemv_merge(
    dev: &GpuDevice,
    n: usize,
    heads: usize,
    head_dim: usize,
    splits: usize,
    empty: usize,
    format: WeightFormat,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = heads * head_dim;
    let live = splits - empty;
    let mut part_out = vec![0.0f32; heads * splits * head_dim];
    let mut part_max = vec![f32::NEG_INFINITY; heads * splits];
    let mut part_sum = vec![0.0f32; heads * splits];
    for h in 0..heads {
        for s in 0..live {
            part_max[h * splits + s] = rng.random_range(-4.0f32..4.0);
            part_sum[h * splits + s] = rng.random_range(0.5f32..20.0);
            for d in 0..head_dim {
                part_out[(h * splits + s) * head_dim + d] = rng.random_range(-10.0f32..10.0);
            }
        }
    }
    let mut act = vec![0.0f32; k];
    for h in 0..heads {
        let maxima = &part_max[h * splits..(h + 1) * splits];
        let big = maxima.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = maxima.iter().map(|&m| if m == f32::NEG_INFINITY { 0.0 } else { (m - big).exp2() }).collect();
        let total: f32 = (0..splits).map(|s| part_sum[h * splits + s] * weights[s]).sum();
        for d in 0..head_dim {
            let value: f32 = (0..splits).map(|s| part_out[(h * splits + s) * head_dim + d] * weights[s]).sum();
            act[h * head_dim + d] = value / total;
        }
    }
    round_bf16(&mut act);
    as_read_by(format, &mut act);
    let w = random_bf16_values(&mut rng, n * k, 0.1);
    let (w_dev, w) = device_weight(dev, &w, n, k, format)?;
    let want = matmul_reference(&act, &w, None, 1, k, n);
    let stream = &dev.stream;
    let (out_dev, max_dev, sum_dev) = (stream.clone_htod(&part_out)?, stream.clone_htod(&part_max)?, stream.clone_htod(&part_sum)?);
    let out = stream.clone_htod(&vec![bf16::NAN; n])?;
    let input = GemvInput::Merge { part_out: ptr(dev, &out_dev), part_max: ptr(dev, &max_dev), part_sum: ptr(dev, &sum_dev), splits, head_dim };
    let g = Gemv { out: ptr(dev, &out), out_type: OutType::Bf16, input, w: w_dev.weight(dev), bias: 0, m: 1, k, n };
    unsafe { gemv(dev, &g)? };
    let got = download_bf16(dev, &out, n)?;
    let detail = format!("n {n}, {heads} heads of {head_dim}, {splits} splits ({empty} empty)");
    Ok(CheckRow::error(&format!("{} +merge", gemv_label(format)), detail, relative_error(&got, &want)))
}

/// The GEMV with the residual add and RMSNorm folded into its input against the unfused
/// composition (`fused_add_rmsnorm`, rounded to bf16, then the product, plus bias) on the CPU,
/// and the residual it writes back against residual + delta. With `indirect`, the input rows are
/// picked from a larger residual by a row list (the final norm of the wanted rows) and nothing
/// is written back, as the lm_head launch does.
#[allow(clippy::too_many_arguments)]
pub fn check_gemv_norm(
    dev: &GpuDevice,
    m: usize,
    n: usize,
    hidden: usize,
    with_delta: bool,
    indirect: bool,
    with_bias: bool,
    format: WeightFormat,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let residual_rows = if indirect { m + 5 } else { m };
    let residual = random_bf16_values(&mut rng, residual_rows * hidden, 2.0);
    let delta = random_bf16_values(&mut rng, residual_rows * hidden, 2.0);
    let weight = random_bf16_values(&mut rng, hidden, 1.5);
    let w = random_bf16_values(&mut rng, n * hidden, 0.1);
    let bias = random_bf16_values(&mut rng, n, 1.0);
    // Row r of the input is residual row `rows[r]`: scattered and out of order when indirect.
    let rows: Vec<u32> = (0..m).map(|r| if indirect { ((r * 3 + 4) % residual_rows) as u32 } else { r as u32 }).collect();
    let mut summed = vec![0.0f32; residual_rows * hidden];
    for (i, s) in summed.iter_mut().enumerate() {
        *s = residual[i] + if with_delta { delta[i] } else { 0.0 };
    }
    let mut normed = vec![0.0f32; m * hidden];
    for (r, &row) in rows.iter().enumerate() {
        let row = row as usize;
        ops::rms_norm(&mut normed[r * hidden..(r + 1) * hidden], &summed[row * hidden..(row + 1) * hidden], &weight, 1e-5);
    }
    round_bf16(&mut normed);
    as_read_by(format, &mut normed);
    let (w_dev, w) = device_weight(dev, &w, n, hidden, format)?;
    let want = matmul_reference(&normed, &w, with_bias.then_some(&bias[..]), m, hidden, n);

    let stream = &dev.stream;
    let residual_dev = stream.clone_htod(&residual)?;
    let delta_dev = stream.clone_htod(&to_bf16(&delta))?;
    let (weight_dev, bias_dev) = (stream.clone_htod(&weight)?, stream.clone_htod(&bias)?);
    let rows_dev = stream.clone_htod(&rows)?;
    let residual_out = stream.clone_htod(&vec![f32::NAN; residual_rows * hidden])?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let input = GemvInput::AddNorm {
        residual: ptr(dev, &residual_dev),
        delta: if with_delta { ptr(dev, &delta_dev) } else { 0 },
        weight: ptr(dev, &weight_dev),
        residual_out: if indirect { 0 } else { ptr(dev, &residual_out) },
        rows: if indirect { ptr(dev, &rows_dev) } else { 0 },
        eps: 1e-5,
    };
    let bias = if with_bias { ptr(dev, &bias_dev) } else { 0 };
    let g = Gemv { out: ptr(dev, &out), out_type: OutType::Bf16, input, w: w_dev.weight(dev), bias, m, k: hidden, n };
    unsafe { gemv(dev, &g)? };
    let mut got = download_bf16(dev, &out, m * n)?;
    let mut want = want;
    if !indirect {
        // The residual written back: exactly residual + delta (float32, the same one addition).
        got.extend(stream.clone_dtoh(&residual_out)?);
        want.extend_from_slice(&summed);
    }
    let detail = format!(
        "m {m} n {n} k {hidden}{}{}{}",
        if with_delta { " +delta" } else { "" },
        if indirect { " rows[] no write-back" } else { " write-back" },
        if with_bias { " +bias" } else { "" }
    );
    Ok(CheckRow::error(&format!("{} +add+norm", gemv_label(format)), detail, relative_error(&got, &want)))
}

/// The small-M linear layers: the GEMV (through `linear`, so the path it prefers) on SmolLM2's
/// shapes, an odd N, a K cuBLAS takes instead, M = 1, 2, 3, 8, bf16 and float32 out, and the 8B
/// widths; then each fused variant, at SmolLM2's widths and the 8B's.
pub fn gemv_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    let mut seed = 200;
    for (n, k) in [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (1001, 576), (1001, 200), (130, 100)] {
        for m in [1, 2, 3, 8] {
            seed += 1;
            let out_type = if n == 49152 || m == 2 { OutType::F32 } else { OutType::Bf16 };
            rows.push(check_gemv(dev, m, n, k, out_type, seed)?);
        }
    }
    // The Llama-3.1-8B widths at one row, where the GEMV streams large weights: K = 4096 and
    // 14336 (two passes of the block-wide staging, shared memory above the 48 KB default at two
    // rows), and a small weight of K = 14336 at two rows.
    for (m, n, k) in [(1, 6144, 4096), (1, 4096, 14336), (2, 100, 14336)] {
        seed += 1;
        rows.push(check_gemv(dev, m, n, k, OutType::Bf16, seed)?);
    }
    // The skinny tensor-core kernel (`cuda::skinny`, 2 to 64 rows): each tile count, partial
    // row groups (1001 rows), K split over blocks (the 8B QKV in 5 splits, down in 8 of 1792)
    // and not (gate-up), a float32 head.
    for (m, n, k, out_type) in [
        (9, 960, 576, OutType::Bf16),
        (16, 1001, 1536, OutType::Bf16),
        (27, 49152, 576, OutType::F32),
        (32, 6144, 4096, OutType::Bf16),
        (32, 4096, 14336, OutType::Bf16),
        (32, 28672, 4096, OutType::Bf16),
        (5, 4096, 4096, OutType::F32),
        (64, 576, 1536, OutType::Bf16),
        (50, 4096, 14336, OutType::Bf16),
    ] {
        seed += 1;
        rows.push(check_gemv(dev, m, n, k, out_type, seed)?);
    }
    for m in [1, 3, 8] {
        rows.push(check_gemv_silu(dev, m, 576, 1536, WeightFormat::Bf16, 300 + m as u64)?);
        rows.push(check_gemv_silu(dev, m, 1001, 200, WeightFormat::Bf16, 310 + m as u64)?);
    }
    rows.push(check_gemv_silu(dev, 1, 512, 14336, WeightFormat::Bf16, 320)?);
    rows.push(check_gemv_silu(dev, 2, 100, 14336, WeightFormat::Bf16, 321)?);
    // Past the GEMV's rows: the skinny kernel's SiLU staging where it is on (each tile count,
    // K split as the 8B down projection's 8 of 1,792, and not), `silu_and_mul` then cuBLAS where
    // it is off.
    for (m, n, inter, seed) in [(9, 576, 1536, 322), (16, 1001, 576, 323), (32, 4096, 14336, 324), (64, 576, 1536, 325), (50, 300, 14336, 326)] {
        rows.push(check_gemv_silu(dev, m, n, inter, WeightFormat::Bf16, seed)?);
    }
    for (m, n, with_delta, indirect, with_bias) in [
        (1, 960, true, false, false),
        (3, 3072, true, false, false),
        (8, 960, false, false, true),
        (2, 1001, true, false, true),
        (1, 49152, true, true, false),
        (5, 4000, true, true, false),
    ] {
        seed += 1;
        rows.push(check_gemv_norm(dev, m, n, 576, with_delta, indirect, with_bias, WeightFormat::Bf16, seed)?);
    }
    for (m, n, with_delta, indirect, with_bias) in [(1, 1024, true, false, false), (2, 600, true, false, true), (1, 2000, true, true, false)] {
        seed += 1;
        rows.push(check_gemv_norm(dev, m, n, 4096, with_delta, indirect, with_bias, WeightFormat::Bf16, seed)?);
    }
    // The 8B layout in a batch-1 graph (33 splits, 25 past a context of 512), SmolLM2's, and
    // Gemma's head dim of 256.
    for (n, heads, head_dim, splits, empty) in [(4096, 32, 128, 33, 25), (576, 9, 64, 8, 0), (640, 4, 256, 5, 2)] {
        seed += 1;
        rows.push(check_gemv_merge(dev, n, heads, head_dim, splits, empty, WeightFormat::Bf16, seed)?);
    }
    Ok(rows)
}

/// Sequence i of a check's batches in cache blocks `i * per_seq ..(i + 1) * per_seq`, room for
/// its prompt and two more tokens.
struct SeqBlocks {
    block_size: usize,
    per_seq: usize,
    num_blocks: usize,
}

impl SeqBlocks {
    fn new<P: AsRef<[u32]>>(prompts: &[P], block_size: usize) -> Self {
        let per_seq = (prompts.iter().map(|p| p.as_ref().len()).max().unwrap_or(1) + 2).div_ceil(block_size);
        SeqBlocks { block_size, per_seq, num_blocks: per_seq * prompts.len() }
    }

    fn table(&self, i: usize) -> Vec<u32> {
        ((i * self.per_seq) as u32..((i + 1) * self.per_seq) as u32).collect()
    }

    /// Every prompt's prefill as one batch.
    fn prefill<P: AsRef<[u32]>>(&self, prompts: &[P]) -> Result<ForwardBatch, CudaError> {
        let mut batch = ForwardBatch::new(self.block_size, self.num_blocks);
        for (i, p) in prompts.iter().enumerate() {
            batch.push_seq(p.as_ref(), 0, &self.table(i), true).map_err(|e| CudaError::Config(e.to_string()))?;
        }
        Ok(batch)
    }

    /// The next decode step of the first `count` sequences, each token the argmax of its row of
    /// the prefill's `logits`.
    fn decode_after<P: AsRef<[u32]>>(&self, prompts: &[P], logits: &[f32], vocab: usize, count: usize) -> Result<ForwardBatch, CudaError> {
        let mut batch = ForwardBatch::new(self.block_size, self.num_blocks);
        for (i, p) in prompts.iter().enumerate().take(count) {
            let next = crate::sampling::argmax(&logits[i * vocab..(i + 1) * vocab]) as u32;
            batch.push_seq(&[next], p.as_ref().len(), &self.table(i), true).map_err(|e| CudaError::Config(e.to_string()))?;
        }
        Ok(batch)
    }
}

/// Decode steps at batch 1 and at up to 8 sequences, where the forward takes the fused GEMV
/// path, against the same steps with every product through cuBLAS (the unfused kernels) and
/// against the CPU with bf16-rounded weights: logits within `FORWARD_TOLERANCE`. Decode-only
/// steps are the ones whose RoPE and cache write the attention kernel does itself, so with an
/// FP8 `cache` this is the serving path's forward over it.
pub fn check_forward_small_batch(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>], cache: KvCacheDtype) -> Result<Vec<CheckRow>, CudaError> {
    let prompts = &prompts[..prompts.len().min(GEMV_MAX_ROWS)];
    let blocks = SeqBlocks::new(prompts, 16);
    let (num_blocks, block_size) = (blocks.num_blocks, blocks.block_size);
    let rounded = cpu_model.map_matrices(|v| bf16::from_f32(v).to_f32());
    // Over an FP8 cache, the CPU over an exact one too: its distance sets the CPU row's tolerance.
    let mut exact = (cache == KvCacheDtype::Fp8E4M3).then(|| CpuBackend::new(rounded.clone(), num_blocks, block_size));
    let mut cpu = CpuBackend::with_kv_cache(rounded, num_blocks, block_size, cache);
    let mut gpu = GpuBackend::with_kv_cache(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size, cache)?;
    let prefill = blocks.prefill(prompts)?;
    let logits = gpu.forward_logits(&prefill)?;
    cpu.forward(&prefill).map_err(|e| CudaError::Config(e.to_string()))?;
    if let Some(exact) = exact.as_mut() {
        exact.forward(&prefill).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    let vocab = cpu_model.config().vocab_size;
    let mut rows = Vec::new();
    for batch_size in [1, prompts.len()] {
        let decode = blocks.decode_after(prompts, &logits, vocab, batch_size)?;
        // Each run rewrites the step's own cache slots before reading them, so the three see
        // the same cache.
        let fused = gpu.forward_logits(&decode)?;
        gpu.set_gemv_enabled(false);
        let unfused = gpu.forward_logits(&decode)?;
        gpu.set_gemv_enabled(true);
        let want = cpu.forward(&decode).map_err(|e| CudaError::Config(e.to_string()))?;
        let cpu_tolerance = match exact.as_mut() {
            Some(exact) => fp8_cache_tolerance(&want, &exact.forward(&decode).map_err(|e| CudaError::Config(e.to_string()))?),
            None => FORWARD_TOLERANCE,
        };
        let names = match cache {
            KvCacheDtype::Auto => ["gemv fwd vs cuBLAS", "gemv fwd vs bf16 CPU"],
            KvCacheDtype::Fp8E4M3 => ["gemv fwd fp8 KV vs cuBLAS", "gemv fwd fp8 KV vs bf16 CPU"],
        };
        // (The two GPU runs share the prompt's cache; only the new token's key and value, which
        // each writes itself, may round apart.)
        for (name, reference, tolerance) in [(names[0], &unfused, FORWARD_TOLERANCE), (names[1], &want, cpu_tolerance)] {
            let error = relative_error(&fused, reference);
            let shown = if tolerance == FORWARD_TOLERANCE { String::new() } else { format!(" (tolerance {tolerance:.3})") };
            rows.push(CheckRow {
                name: name.into(),
                detail: format!("decode logits, {batch_size} sequences{shown}"),
                error: Some(error),
                passed: error < tolerance,
            });
        }
    }
    Ok(rows)
}

/// A decode step of more sequences than the GEMV takes (cuBLAS products) with every product
/// split over K (`SplitK::Every`: the residual adds and norms sum the o and down projections'
/// partials, every other consumer gets them summed first) against the same step unsplit and
/// against the CPU, in two slices and in the most (`launch::SPLIT_K_MAX_SLICES`). Each row fails
/// if no product split (the profile of the split step counts them).
pub fn check_forward_split_k(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>]) -> Result<Vec<CheckRow>, CudaError> {
    use crate::cuda::SplitK;
    let sequences = 12;
    let prompts: Vec<&Vec<u32>> = prompts.iter().cycle().take(sequences).collect();
    let blocks = SeqBlocks::new(&prompts, 16);
    let mut cpu = CpuBackend::new(cpu_model.map_matrices(|v| bf16::from_f32(v).to_f32()), blocks.num_blocks, blocks.block_size);
    let mut gpu = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, blocks.num_blocks, blocks.block_size)?;
    let prefill = blocks.prefill(&prompts)?;
    let logits = gpu.forward_logits(&prefill)?;
    cpu.forward(&prefill).map_err(|e| CudaError::Config(e.to_string()))?;
    let decode = blocks.decode_after(&prompts, &logits, cpu_model.config().vocab_size, sequences)?;
    // Each run rewrites the step's own cache slots before reading them (see
    // `check_forward_small_batch`).
    // The split run is profiled to count the products it split: rows that compared two unsplit
    // runs (a model whose shapes never split) must not pass.
    let (before, slices_before) = (dev.split_k(), dev.split_k_slices());
    dev.set_split_k(SplitK::Off);
    let whole = gpu.forward_logits(&decode);
    dev.set_split_k(before);
    let whole = whole?;
    let want = cpu.forward(&decode).map_err(|e| CudaError::Config(e.to_string()))?;
    let mut rows = Vec::new();
    for slices in [crate::cuda::launch::SPLIT_K_SLICES, crate::cuda::launch::SPLIT_K_MAX_SLICES] {
        dev.set_split_k(SplitK::Every);
        dev.set_split_k_slices(slices);
        gpu.swap_profiler(Some(crate::cuda::profile::StepProfiler::default()));
        let split = gpu.forward_logits(&decode);
        let profiler = gpu.swap_profiler(None).expect("installed above");
        dev.set_split_k(before);
        dev.set_split_k_slices(slices_before);
        let split = split?;
        let kinds = profiler.finish()?;
        let count = |kind: &str| kinds.iter().filter(|k| k.kind == kind).map(|k| k.count).sum::<usize>();
        let (split_products, qkv_sums) = (count("linear split-K"), count("attention +QKV sum"));
        let detail = format!("decode logits, {sequences} sequences, {slices} slices: {split_products} products split, {qkv_sums} attentions summed their QKV");
        for (name, reference) in [("split-K fwd vs unsplit", &whole), ("split-K fwd vs bf16 CPU", &want)] {
            let error = relative_error(&split, reference);
            rows.push(CheckRow { name: name.into(), detail: detail.clone(), error: Some(error), passed: split_products > 0 && error < FORWARD_TOLERANCE });
        }
    }
    Ok(rows)
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

/// The standard set of kernel checks: the decode kernel on odd sizes, one block, many blocks, GQA
/// groups 1, 3, 4, 7, 8, 12 and 16, head dims 64 and 128, with and without split-K; the prefill kernel
/// alone (one token, lengths off the tile and block sizes, chunked prefill and prefix-cache hits,
/// GQA groups 1 to 8 incl. 3 and 7); the decode kernel over more cache blocks than it stages in
/// shared memory; both kernels with cache blocks of 1, 5 and 32 positions;
/// mixed batches split between the two kernels as the backend splits them; RoPE in both forms;
/// RMSNorm; SiLU.
pub fn kernel_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    let mut seed = 1;
    let fresh = |lens: &[usize]| -> Vec<(usize, usize)> { lens.iter().map(|&l| (0, l)).collect() };
    let decode_layouts =
        [(4, 4, 64), (9, 3, 64), (32, 8, 128), (12, 4, 128), (14, 2, 64), (16, 2, 64), (32, 2, 128), (12, 1, 64), (24, 2, 128), (8, 4, 256), (4, 1, 256)];
    for (heads, kv_heads, head_dim) in decode_layouts {
        for lens in [&[1usize][..], &[16], &[37, 5], &[300, 1, 129]] {
            seed += 1;
            rows.push(check_attention(dev, heads, kv_heads, head_dim, &fresh(lens), AttentionPath::Decode, 1, seed)?);
        }
    }
    // Split-K over long contexts.
    rows.push(check_attention(dev, 32, 8, 128, &fresh(&[1500, 700]), AttentionPath::Decode, 3, 91)?);
    rows.push(check_attention(dev, 9, 3, 64, &fresh(&[1100]), AttentionPath::Decode, 3, 92)?);
    rows.push(check_attention(dev, 32, 2, 128, &fresh(&[1000, 65]), AttentionPath::Decode, 7, 97)?);
    // Split-K as the backend plans it: a batch of long decodes, where a few splits must each cover
    // a long stretch (64 sequences at 1801 and 2048 positions), and batch 1 (many short splits).
    for (heads, kv_heads, head_dim, batch, context) in
        [(9, 3, 64, 64, 1801), (32, 8, 128, 64, 2048), (9, 3, 64, 1, 512), (32, 8, 128, 1, 2048)]
    {
        let split = AttentionSplit::plan(context, batch * kv_heads, dev.decode_slots(head_dim));
        let seqs = vec![(context - 1, 1); batch];
        rows.push(check_attention(dev, heads, kv_heads, head_dim, &seqs, AttentionPath::Decode, split.splits, 96 + context as u64)?);
    }
    // A partition of more cache blocks than a decode block stages in shared memory (`DC_TABLE`,
    // 256) reads its block table from global memory, beside sequences short enough to stage theirs.
    rows.push(check_attention_over(dev, KvCacheDtype::Auto, 1, 32, 8, 128, &fresh(&[300, 1, 129]), AttentionPath::Decode, 1, 0, 115)?);
    rows.push(check_attention(dev, 32, 8, 128, &fresh(&[4200, 40]), AttentionPath::Decode, 1, 116)?);
    // Cache blocks other than 16 positions: a tile of keys spans many blocks, or part of one.
    for block_size in [1, 5, 32, 64] {
        seed += 1;
        let seqs = fresh(&[300, 1, 129]);
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, block_size, 32, 8, 128, &seqs, AttentionPath::Decode, 2, 0, seed)?);
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, block_size, 9, 3, 64, &seqs, AttentionPath::Prefill, 1, 0, seed)?);
    }

    // The prefill kernel alone.
    let layouts = [(9, 3, 64), (12, 4, 128), (8, 8, 64), (8, 8, 128), (14, 2, 64), (32, 8, 128), (7, 1, 64), (16, 2, 128), (8, 4, 256), (4, 1, 256)];
    for (heads, kv_heads, head_dim) in layouts {
        for lens in [&[1usize][..], &[17], &[64], &[100], &[37, 5, 129]] {
            seed += 1;
            rows.push(check_attention(dev, heads, kv_heads, head_dim, &fresh(lens), AttentionPath::Prefill, 1, seed)?);
        }
    }
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128)] {
        rows.push(check_attention(dev, heads, kv_heads, head_dim, &[(0, 1000)], AttentionPath::Prefill, 1, seed + 1)?);
        // Chunked prefill: a chunk of 37 at position 200, the earlier chunks' keys in the cache;
        // then prefix-cache hits of several sizes (on and off block and tile boundaries).
        rows.push(check_attention(dev, heads, kv_heads, head_dim, &[(200, 37)], AttentionPath::Prefill, 1, seed + 2)?);
        rows.push(check_attention(dev, heads, kv_heads, head_dim, &[(96, 130), (16, 1), (64, 64), (5, 70)], AttentionPath::Prefill, 1, seed + 3)?);
        seed += 3;
    }
    rows.push(check_attention(dev, 14, 2, 64, &[(200, 37)], AttentionPath::Prefill, 1, 93)?);
    rows.push(check_attention(dev, 12, 4, 128, &[(200, 37)], AttentionPath::Prefill, 1, 94)?);

    // Mixed batches as the backend launches them: two prefills (one a chunk after a cached
    // prefix) and three decode tokens; then decode rows long enough for split-K beside prefills.
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128), (14, 2, 64), (12, 4, 128)] {
        seed += 1;
        let batch = [(0, 100), (30, 1), (50, 37), (200, 1), (0, 1)];
        rows.push(check_attention(dev, heads, kv_heads, head_dim, &batch, AttentionPath::Mixed, 1, seed)?);
    }
    rows.push(check_attention(dev, 32, 8, 128, &[(0, 70), (1500, 1), (0, 129), (700, 1), (3, 1)], AttentionPath::Mixed, 3, 95)?);
    // Sliding windows: shorter and longer than the contexts, across tile and block edges, with
    // and without split-K; prefill chunks whose rows see different windows; a mixed batch.
    for (window, splits) in [(7, 1), (64, 1), (100, 2), (1000, 3), (4096, 1)] {
        let decode = fresh(&[1500, 700, 90, 3]);
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 32, 8, 128, &decode, AttentionPath::Decode, splits, window, 98)?);
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 9, 3, 64, &decode, AttentionPath::Decode, splits, window, 99)?);
    }
    for window in [7, 64, 100, 500] {
        let prefill = [(0, 300), (200, 130), (5, 70)];
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 32, 8, 128, &prefill, AttentionPath::Prefill, 1, window, 100)?);
        rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 8, 4, 64, &prefill, AttentionPath::Prefill, 1, window, 101)?);
    }
    rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 32, 8, 128, &[(0, 70), (1500, 1), (0, 129), (700, 1)], AttentionPath::Mixed, 3, 100, 102)?);
    // Gemma 3's head dim 256 with its windows, split and not.
    rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 8, 4, 256, &[(0, 70), (1500, 1), (0, 129), (700, 1)], AttentionPath::Mixed, 3, 100, 103)?);
    rows.push(check_attention_over(dev, KvCacheDtype::Auto, 16, 4, 1, 256, &fresh(&[1500, 700, 90, 3]), AttentionPath::Decode, 1, 512, 104)?);
    rows.push(check_attention(dev, 9, 3, 64, &[(1100, 1), (40, 300), (60, 1)], AttentionPath::Mixed, 3, 96)?);
    // RoPE and the cache write fused into the decode kernel (decode-only batches): the 8B layout
    // split in 8 (batch 1 at context 512) with sequences shorter than a split, unsplit, partial
    // rotary with a magnitude through a window, and head dim 256.
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 32, 8, 128, 128, 1.0, &[511], 8, 0, 1, 110)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 32, 8, 128, 128, 1.0, &[1500, 3, 700, 64, 0], 6, 0, 1, 111)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 32, 8, 128, 128, 1.0, &[300, 17], 1, 0, 1, 112)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 9, 3, 64, 32, 1.2, &[1100, 60, 5], 3, 100, 1, 113)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 8, 4, 256, 256, 1.0, &[900, 31], 4, 0, 1, 114)?);
    // The QKV product left in K slices (`SplitK::Qkv`): the kernel sums the partials as it reads.
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 32, 8, 128, 128, 1.0, &[1500, 3, 700, 64, 0], 6, 0, 2, 117)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 9, 3, 64, 32, 1.2, &[1100, 60, 5], 1, 100, 3, 118)?);
    rows.push(check_fused_rope_attention(dev, KvCacheDtype::Auto, 32, 8, 128, 128, 1.0, &[255, 130, 256], 1, 0, 4, 119)?);

    for interleaved in [false, true] {
        rows.push(check_rope(dev, KvCacheDtype::Auto, 37, 9, 3, 64, 64, 1.0, interleaved, 7)?);
        rows.push(check_rope(dev, KvCacheDtype::Auto, 5, 32, 8, 128, 128, 1.0, interleaved, 8)?);
    }
    // Partial rotary (the rest of each head passes through) and YaRN's magnitude.
    rows.push(check_rope(dev, KvCacheDtype::Auto, 9, 8, 2, 128, 64, 1.0, false, 9)?);
    rows.push(check_rope(dev, KvCacheDtype::Auto, 9, 8, 2, 64, 64, 1.2079, false, 10)?);
    // The norm and the gated activation take 8 values a thread where rows are 8-aligned (two
    // register chunks past 8,192 values), and a scalar loop where they are not (4,100; 1,001).
    // With `scaled`, each also folds in an FP8 GEMM's output scales (vector and scalar paths).
    for scaled in [false, true] {
        rows.push(check_rmsnorm(dev, 7, 576, scaled, 3)?);
        rows.push(check_rmsnorm(dev, 3, 4096, scaled, 4)?);
        rows.push(check_rmsnorm(dev, 2, 12288, scaled, 12)?);
        rows.push(check_rmsnorm(dev, 3, 4100, scaled, 13)?);
        rows.push(check_silu(dev, 5, 1536, scaled, 5)?);
        rows.push(check_silu(dev, 2, 14336, scaled, 6)?);
        rows.push(check_silu(dev, 3, 1001, scaled, 14)?);
    }
    // Products split over K into partials (`launch::split_k_splits`): the 8B down and o
    // projections at rows where they split, SmolLM2's down, and rows not 8-aligned (the norm's
    // scalar loop).
    rows.extend(check_split_k(dev, 8, 4096, 14336, 2, 15)?);
    rows.extend(check_split_k(dev, 12, 4096, 4096, 2, 16)?);
    rows.extend(check_split_k(dev, 33, 576, 1536, 2, 17)?);
    rows.extend(check_split_k(dev, 5, 260, 256, 2, 18)?);
    // Four slices (`PAGEDSERVE_SPLIT_K_SLICES=4`): the 8B down and o projections at 32 rows.
    rows.extend(check_split_k(dev, 32, 4096, 14336, 4, 19)?);
    rows.extend(check_split_k(dev, 32, 4096, 4096, 4, 20)?);
    // Experts: one token; several tiles per expert (300 tokens over 8 experts); Qwen3-30B-A3B's
    // 128 experts, top-8; widths that are not multiples of the tile.
    rows.extend(check_moe(dev, 1, 256, 8, 2, 128, true, 11)?);
    rows.extend(check_moe(dev, 300, 256, 8, 2, 128, true, 12)?);
    rows.extend(check_moe(dev, 37, 2048, 128, 8, 768, true, 13)?);
    rows.extend(check_moe(dev, 5, 200, 6, 3, 40, false, 14)?);
    rows.extend(architecture_kernel_checks(dev)?);
    rows.extend(dequant_checks(dev)?);
    Ok(rows)
}

/// The attention kernels over an FP8 cache (`--kv-cache-dtype fp8`; sm_89 on, else no rows), each
/// against the CPU's attention over a `CpuKvCache` of the same E4M3 bytes: the decode kernel's
/// permuted fragments at head dims 64, 128 and 256, GQA groups 1 to 12 (past 8 the MMA's upper
/// rows), odd lengths, split-K, cache blocks of 1, 5 and 32 positions, a window; the prefill
/// kernel's conversion pass over lengths off the tile, a chunk after a cached prefix and prefix
/// hits; a mixed batch; RoPE and the cache write fused into the decode kernel, and `rope_and_cache`.
pub fn fp8_cache_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    if dev.compute_capability() < 89 {
        return Ok(rows);
    }
    let fp8 = KvCacheDtype::Fp8E4M3;
    let fresh = |lens: &[usize]| -> Vec<(usize, usize)> { lens.iter().map(|&l| (0, l)).collect() };
    let mut seed = 300;
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128), (12, 1, 64), (24, 2, 128), (8, 4, 256), (4, 4, 64)] {
        for lens in [&[1usize][..], &[37, 5], &[300, 1, 129]] {
            seed += 1;
            rows.push(check_attention_over(dev, fp8, 16, heads, kv_heads, head_dim, &fresh(lens), AttentionPath::Decode, 1, 0, seed)?);
        }
        for lens in [&[1usize][..], &[17], &[100], &[37, 5, 129]] {
            seed += 1;
            rows.push(check_attention_over(dev, fp8, 16, heads, kv_heads, head_dim, &fresh(lens), AttentionPath::Prefill, 1, 0, seed)?);
        }
    }
    rows.push(check_attention_over(dev, fp8, 16, 32, 8, 128, &fresh(&[1500, 700]), AttentionPath::Decode, 3, 0, 320)?);
    rows.push(check_attention_over(dev, fp8, 16, 9, 3, 64, &fresh(&[1100]), AttentionPath::Decode, 3, 0, 321)?);
    for block_size in [1, 5, 32] {
        let seqs = fresh(&[300, 1, 129]);
        rows.push(check_attention_over(dev, fp8, block_size, 32, 8, 128, &seqs, AttentionPath::Decode, 2, 0, 322)?);
        rows.push(check_attention_over(dev, fp8, block_size, 9, 3, 64, &seqs, AttentionPath::Prefill, 1, 0, 323)?);
    }
    rows.push(check_attention_over(dev, fp8, 16, 32, 8, 128, &fresh(&[1500, 700, 90, 3]), AttentionPath::Decode, 2, 100, 324)?);
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128)] {
        rows.push(check_attention_over(dev, fp8, 16, heads, kv_heads, head_dim, &[(200, 37)], AttentionPath::Prefill, 1, 0, 325)?);
        rows.push(check_attention_over(dev, fp8, 16, heads, kv_heads, head_dim, &[(96, 130), (16, 1), (64, 64), (5, 70)], AttentionPath::Prefill, 1, 0, 326)?);
        rows.push(check_attention_over(dev, fp8, 16, heads, kv_heads, head_dim, &[(0, 300), (200, 130)], AttentionPath::Prefill, 1, 64, 327)?);
    }
    rows.push(check_attention_over(dev, fp8, 16, 32, 8, 128, &[(0, 70), (1500, 1), (0, 129), (700, 1), (3, 1)], AttentionPath::Mixed, 3, 0, 328)?);
    rows.push(check_fused_rope_attention(dev, fp8, 32, 8, 128, 128, 1.0, &[511], 8, 0, 1, 330)?);
    rows.push(check_fused_rope_attention(dev, fp8, 32, 8, 128, 128, 1.0, &[1500, 3, 700, 64, 0], 6, 0, 1, 331)?);
    rows.push(check_fused_rope_attention(dev, fp8, 32, 8, 128, 128, 1.0, &[511, 40], 8, 0, 2, 338)?);
    rows.push(check_fused_rope_attention(dev, fp8, 9, 3, 64, 32, 1.2, &[1100, 60, 5], 3, 100, 1, 332)?);
    rows.push(check_fused_rope_attention(dev, fp8, 8, 4, 256, 256, 1.0, &[900, 31], 4, 0, 1, 333)?);
    for interleaved in [false, true] {
        rows.push(check_rope(dev, fp8, 37, 9, 3, 64, 64, 1.0, interleaved, 334)?);
        rows.push(check_rope(dev, fp8, 5, 32, 8, 128, 128, 1.0, interleaved, 335)?);
    }
    rows.push(check_rope(dev, fp8, 9, 8, 2, 128, 64, 1.0, false, 336)?);
    rows.push(check_rope(dev, fp8, 9, 8, 2, 64, 64, 1.2079, false, 337)?);
    Ok(rows)
}

/// The kernels the newer architectures add, each against the CPU on random bfloat16 inputs: the
/// bf16-to-bf16 RMSNorm (Gemma's sandwich norms), the per-head q/k RMSNorm (in place, only the
/// heads asked for), GELU-tanh-and-multiply, logit soft-capping and the scaled embedding gather.
pub fn architecture_kernel_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rng = StdRng::seed_from_u64(21);
    let stream = &dev.stream;
    let mut rows = Vec::new();
    let rows_config = |n: usize, width: usize| LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 };
    let (n, hidden, eps) = (7usize, 1152usize, 1e-6f32);

    let x = random_bf16_values(&mut rng, n * hidden, 3.0);
    let weight = random_bf16_values(&mut rng, hidden, 2.0);
    let mut want = vec![0.0f32; n * hidden];
    for (out, row) in want.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
        ops::rms_norm(out, row, &weight, eps);
    }
    let (x_dev, w_dev) = (stream.clone_htod(&to_bf16(&x))?, stream.clone_htod(&weight)?);
    let out_dev = stream.clone_htod(&vec![bf16::NAN; n * hidden])?;
    // SAFETY: `n` rows of `hidden` in and out, a `hidden` weight.
    unsafe { launchers::rmsnorm_bf16(dev, rows_config(n, hidden), ptr(dev, &x_dev), ptr(dev, &w_dev), ptr(dev, &out_dev), hidden as i32, eps)? };
    rows.push(CheckRow::error("rmsnorm_bf16", format!("{n} x {hidden}"), relative_error(&download_bf16(dev, &out_dev, n * hidden)?, &want)));

    for (heads, kv_heads, head_dim) in [(8, 4, 128), (16, 8, 64), (4, 1, 256)] {
        let width = (heads + 2 * kv_heads) * head_dim;
        let qkv = random_bf16_values(&mut rng, n * width, 3.0);
        let weight = random_bf16_values(&mut rng, head_dim, 2.0);
        // The key heads only (first head `heads`): the query and value heads must stay as they were.
        let mut want = qkv.clone();
        for row in want.chunks_exact_mut(width) {
            for head in row[heads * head_dim..(heads + kv_heads) * head_dim].chunks_exact_mut(head_dim) {
                let input = head.to_vec();
                ops::rms_norm(head, &input, &weight, eps);
            }
        }
        let (x_dev, w_dev) = (stream.clone_htod(&to_bf16(&qkv))?, stream.clone_htod(&weight)?);
        let config = LaunchConfig { grid_dim: (n as u32, kv_heads.div_ceil(4) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (w, first, count, hd) = (width as i32, heads as i32, kv_heads as i32, head_dim as i32);
        // SAFETY: `n` rows of `width`; the heads normed lie inside each row.
        unsafe { launchers::head_rmsnorm(dev, config, ptr(dev, &x_dev), ptr(dev, &w_dev), w, first, count, hd, eps)? };
        let got = download_bf16(dev, &x_dev, n * width)?;
        rows.push(CheckRow::error("head_rmsnorm", format!("{n} x k heads of {heads}/{kv_heads} hd {head_dim}"), relative_error(&got, &want)));
    }

    let inter = 6912;
    let gate_up = random_bf16_values(&mut rng, n * 2 * inter, 4.0);
    let mut want = vec![0.0f32; n * inter];
    for (out, row) in want.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
        ops::gelu_tanh_mul(out, row);
    }
    let in_dev = stream.clone_htod(&to_bf16(&gate_up))?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; n * inter])?;
    // SAFETY: `n` rows of `2 * inter` in, `inter` out.
    unsafe { launchers::gelu_tanh_and_mul(dev, gated_config(n, inter), ptr(dev, &out_dev), ptr(dev, &in_dev), 0, 0, inter as i32)? };
    rows.push(CheckRow::error("gelu_tanh_and_mul", format!("{n} x {inter}"), relative_error(&download_bf16(dev, &out_dev, n * inter)?, &want)));

    let (vocab, cap) = (5000usize, 30.0f32);
    let logits: Vec<f32> = (0..n * vocab).map(|_| rng.random_range(-80.0f32..80.0)).collect();
    let want: Vec<f32> = logits.iter().map(|&l| cap * (l / cap).tanh()).collect();
    let logits_dev = stream.clone_htod(&logits)?;
    // SAFETY: `n` rows of `vocab` floats.
    unsafe { launchers::softcap_rows(dev, rows_config(n, vocab), ptr(dev, &logits_dev), vocab as i32, cap)? };
    rows.push(CheckRow::error("softcap_rows", format!("{n} x {vocab}, cap {cap}"), relative_error(&stream.clone_dtoh(&logits_dev)?, &want)));

    let table = random_bf16_values(&mut rng, 300 * hidden, 0.05);
    let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..300)).collect();
    let scale = (hidden as f32).sqrt();
    let want: Vec<f32> = tokens.iter().flat_map(|&t| table[t as usize * hidden..(t as usize + 1) * hidden].iter().map(|v| v * scale)).collect();
    let (table_dev, tokens_dev) = (stream.clone_htod(&to_bf16(&table))?, stream.clone_htod(&tokens)?);
    let out_dev = stream.alloc_zeros::<f32>(n * hidden)?;
    // SAFETY: `n` token ids below the table's 300 rows; `n` rows of `hidden` out.
    unsafe {
        launchers::embedding_gather(dev, rows_config(n, hidden), ptr(dev, &out_dev), ptr(dev, &table_dev), ptr(dev, &tokens_dev), hidden as i32, scale, 0, 300)?
    };
    rows.push(CheckRow::error("embedding_gather", format!("{n} x {hidden}, x{scale}"), relative_error(&stream.clone_dtoh(&out_dev)?, &want)));

    // A tensor-parallel rank's table: ids 100..200 of the 300; the others embed as zeros.
    let (first, held) = (100usize, 100usize);
    let table_ref = &table;
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| {
            let t = t as usize;
            let held_row = (first..first + held).contains(&t);
            (0..hidden).map(move |i| if held_row { table_ref[t * hidden + i] * scale } else { 0.0 })
        })
        .collect();
    let part_dev = stream.clone_htod(&to_bf16(&table[first * hidden..(first + held) * hidden]))?;
    // SAFETY: the table holds `held` rows of `hidden`; `n` rows of `hidden` out.
    unsafe {
        launchers::embedding_gather(dev, rows_config(n, hidden), ptr(dev, &out_dev), ptr(dev, &part_dev), ptr(dev, &tokens_dev), hidden as i32, scale, first as i32, held as i32)?
    };
    let outside = tokens.iter().filter(|&&t| !(first..first + held).contains(&(t as usize))).count();
    rows.push(CheckRow::error("embedding_gather range", format!("ids {first}..{} of 300, {outside} of {n} tokens outside", first + held), relative_error(&stream.clone_dtoh(&out_dev)?, &want)));

    // The logits of 3 ranks over a vocabulary of 1001 (ranges of 334, the last 333), as an
    // all-gather leaves them: each rank's `[rows, width]` then padding up to `rows * 334`.
    let (world, vocab) = (3usize, 1001usize);
    let per_rank = crate::model::parallel::vocab_per_rank(vocab, world);
    let whole: Vec<f32> = (0..n * vocab).map(|_| rng.random_range(-10.0f32..10.0)).collect();
    let mut gathered = vec![f32::NAN; world * n * per_rank];
    for r in 0..world {
        let (start, end) = (r * per_rank, ((r + 1) * per_rank).min(vocab));
        for row in 0..n {
            for col in start..end {
                gathered[r * n * per_rank + row * (end - start) + col - start] = whole[row * vocab + col];
            }
        }
    }
    let (gathered_dev, logits_dev) = (stream.clone_htod(&gathered)?, stream.alloc_zeros::<f32>(n * vocab)?);
    // SAFETY: `gathered` holds `world` ranks of `n * per_rank`; `n` rows of `vocab` out.
    unsafe {
        launchers::gather_vocab_ranges(dev, rows_config(n, vocab), ptr(dev, &logits_dev), ptr(dev, &gathered_dev), n as i32, per_rank as i32, vocab as i32)?
    };
    rows.push(CheckRow::error("gather_vocab_ranges", format!("{n} rows, {world} ranks of {per_rank} ids, vocab {vocab}"), relative_error(&stream.clone_dtoh(&logits_dev)?, &whole)));
    Ok(rows)
}

/// GGUF blocks expanded on the device (`kernels/dequant.cu`) against the CPU's dequantizer, for
/// every type the device store takes: random blocks (with finite scales), `rows` rows of `cols`
/// values, and once with Llama's interleaved Q/K rows put back.
pub fn dequant_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    use crate::model::gguf::{dequantize, GgmlType as T};
    let mut rng = StdRng::seed_from_u64(31);
    let mut rows_out = Vec::new();
    // Where each type keeps its f16 (or, for Q8_K, f32) scales: random bytes there could be NaN.
    let scales: &[(T, &[usize])] = &[
        (T::Q4_0, &[0]),
        (T::Q4_1, &[0, 2]),
        (T::Q5_0, &[0]),
        (T::Q5_1, &[0, 2]),
        (T::Q8_0, &[0]),
        (T::Q2_K, &[80, 82]),
        (T::Q3_K, &[108]),
        (T::Q4_K, &[0, 2]),
        (T::Q5_K, &[0, 2]),
        (T::Q6_K, &[208]),
        (T::Q8_K, &[]),
        (T::F32, &[]),
        (T::F16, &[]),
        (T::BF16, &[]),
    ];
    for (i, &(ty, f16_fields)) in scales.iter().enumerate() {
        for qk_head_dim in [0usize, 64] {
            if qk_head_dim > 0 && i % 4 != 0 {
                continue;
            }
            let (rows, cols) = (256, 512);
            let n = rows * cols;
            let (block, size) = (ty.block_size(), ty.type_size());
            let mut bytes: Vec<u8> = (0..n / block * size).map(|_| rng.random()).collect();
            for blk in bytes.chunks_exact_mut(size) {
                for &at in f16_fields {
                    blk[at..at + 2].copy_from_slice(&half::f16::from_f32(rng.random_range(-0.05f32..0.05)).to_le_bytes());
                }
                match ty {
                    T::Q8_K => blk[..4].copy_from_slice(&rng.random_range(-0.01f32..0.01).to_le_bytes()),
                    T::F32 => blk.copy_from_slice(&rng.random_range(-2.0f32..2.0).to_le_bytes()),
                    T::F16 => blk.copy_from_slice(&half::f16::from_f32(rng.random_range(-2.0f32..2.0)).to_le_bytes()),
                    T::BF16 => blk.copy_from_slice(&bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_le_bytes()),
                    _ => {}
                }
            }
            let mut want = vec![0.0f32; n];
            dequantize(ty, &bytes, n, &mut want).map_err(|e| CudaError::Config(e.to_string()))?;
            if let Some(heads) = rows.checked_div(qk_head_dim) {
                want = crate::model::arch::llama::unpermute_qk_rows(&want, heads, cols);
            }
            let in_dev = dev.stream.clone_htod(&bytes)?;
            let out_dev = dev.stream.clone_htod(&vec![bf16::NAN; n])?;
            let config = crate::cuda::launch::dequant_config(rows, cols);
            // SAFETY: `in_dev` holds `rows * cols` values as `ty` blocks, `out_dev` that many bf16.
            unsafe {
                launchers::dequant_ggml(dev, config, ptr(dev, &out_dev), ptr(dev, &in_dev), ty as i32, rows as i32, cols as i32, qk_head_dim as i32)?
            };
            let got = download_bf16(dev, &out_dev, n)?;
            let detail = format!("{ty:?} {rows} x {cols}{}", if qk_head_dim > 0 { ", Q/K rows put back" } else { "" });
            rows_out.push(CheckRow::error("dequant_ggml", detail, relative_error(&got, &want)));
        }
    }
    Ok(rows_out)
}

/// The mixture-of-experts kernels (`kernels/moe.cu`) on random inputs: routing from given router
/// logits must pick exactly the CPU's top-k with its weights, and the grouped products, the
/// activation and the combination must match the CPU computing the same experts (rounded to
/// bfloat16 where the kernels round).
#[allow(clippy::too_many_arguments)]
pub fn check_moe(dev: &GpuDevice, tokens: usize, hidden: usize, experts: usize, top_k: usize, inter: usize, norm_topk: bool, seed: u64) -> Result<Vec<CheckRow>, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, tokens * hidden, 1.0);
    let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let gate_up = random_bf16_values(&mut rng, experts * 2 * inter * hidden, 0.1);
    let down = random_bf16_values(&mut rng, experts * hidden * inter, 0.1);
    let stream = &dev.stream;
    let assignments = tokens * top_k;
    let x_dev = stream.clone_htod(&to_bf16(&x))?;
    let logits_dev = stream.clone_htod(&logits)?;
    let gate_up_dev = stream.clone_htod(&to_bf16(&gate_up))?;
    let down_dev = stream.clone_htod(&to_bf16(&down))?;
    let ids_dev = stream.alloc_zeros::<u32>(assignments)?;
    let weights_dev = stream.alloc_zeros::<f32>(assignments)?;
    let offsets_dev = stream.alloc_zeros::<u32>(experts + 2)?;
    let sorted_dev = stream.alloc_zeros::<u32>(assignments)?;
    let most_tiles = moe_most_tiles(assignments, experts);
    let tiles_dev = stream.alloc_zeros::<u32>(3 * most_tiles)?;
    let gate_up_out = stream.clone_htod(&vec![bf16::NAN; assignments * 2 * inter])?;
    let act_out = stream.clone_htod(&vec![bf16::NAN; assignments * inter])?;
    let down_out = stream.clone_htod(&vec![bf16::NAN; assignments * hidden])?;
    let out_dev = stream.clone_htod(&vec![bf16::NAN; tokens * hidden])?;
    let num_tiles = ptr(dev, &offsets_dev) + 4 * (experts as u64 + 1);
    let (e, k, h, i) = (experts as i32, top_k as i32, hidden as i32, inter as i32);
    let one = |rows: usize, width: usize| LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 };
    let gemm = |cols: usize| moe_gemm_config(cols, most_tiles);
    // SAFETY: every buffer was allocated above at the sizes `kernels/moe.cu` reads and writes.
    unsafe {
        launchers::moe_route(dev, moe_route_config(tokens), ptr(dev, &logits_dev), ptr(dev, &ids_dev), ptr(dev, &weights_dev), tokens as i32, e, k, i32::from(norm_topk))?;
        launchers::moe_group(dev, MOE_GROUP_CONFIG, ptr(dev, &ids_dev), assignments as i32, e, ptr(dev, &offsets_dev), ptr(dev, &sorted_dev), ptr(dev, &tiles_dev))?;
        let (sorted, tiles) = (ptr(dev, &sorted_dev), ptr(dev, &tiles_dev));
        launchers::moe_gemm(dev, gemm(2 * inter), ptr(dev, &gate_up_out), ptr(dev, &x_dev), ptr(dev, &gate_up_dev), sorted, tiles, num_tiles, k, 2 * i, h)?;
        launchers::silu_and_mul(dev, gated_config(assignments, inter), ptr(dev, &act_out), ptr(dev, &gate_up_out), 0, 0, i)?;
        launchers::moe_gemm(dev, gemm(hidden), ptr(dev, &down_out), ptr(dev, &act_out), ptr(dev, &down_dev), sorted, tiles, num_tiles, 1, h, i)?;
        launchers::moe_combine(dev, one(tokens, hidden), ptr(dev, &out_dev), ptr(dev, &down_out), ptr(dev, &weights_dev), k, h)?;
    }
    let ids = stream.clone_dtoh(&ids_dev)?;
    let weights = stream.clone_dtoh(&weights_dev)?;
    let got = download_bf16(dev, &out_dev, tokens * hidden)?;

    // Routing: the CPU's order (larger probability first, lower index on a tie).
    let mut routing_ok = true;
    let mut want_weights = Vec::with_capacity(assignments);
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = row.iter().map(|&l| ((l - max) as f64).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let top = &order[..top_k];
        let top_sum: f64 = top.iter().map(|&e| exp[e] / total).sum();
        routing_ok &= top.iter().zip(&ids[t * top_k..(t + 1) * top_k]).all(|(&want, &got)| want as u32 == got);
        want_weights.extend(top.iter().map(|&e| (exp[e] / total / if norm_topk { top_sum } else { 1.0 }) as f32));
    }
    let mut rows = vec![CheckRow {
        name: "moe_route".into(),
        detail: format!("{tokens} tokens, {experts} experts, top-{top_k}"),
        error: Some(relative_error(&weights, &want_weights)),
        passed: routing_ok && relative_error(&weights, &want_weights) < 1e-5,
    }];
    // The experts the GPU chose, computed on the CPU with the kernels' roundings.
    let round = |v: f32| bf16::from_f32(v).to_f32();
    let mut want = vec![0.0f32; tokens * hidden];
    for t in 0..tokens {
        for j in 0..top_k {
            let (expert, weight) = (ids[t * top_k + j] as usize, weights[t * top_k + j]);
            let input = &x[t * hidden..(t + 1) * hidden];
            let gu = matmul_reference(input, &gate_up[expert * 2 * inter * hidden..(expert + 1) * 2 * inter * hidden], None, 1, hidden, 2 * inter);
            let gu: Vec<f32> = gu.into_iter().map(round).collect();
            let mut act = vec![0.0f32; inter];
            ops::silu_mul(&mut act, &gu);
            let act: Vec<f32> = act.into_iter().map(round).collect();
            let y = matmul_reference(&act, &down[expert * hidden * inter..(expert + 1) * hidden * inter], None, 1, inter, hidden);
            for (w, y) in want[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                *w += weight * round(y);
            }
        }
    }
    rows.push(CheckRow::error("moe experts", format!("{tokens} x {hidden}, {experts} experts top-{top_k}, inter {inter}"), relative_error(&got, &want)));
    Ok(rows)
}

/// Sequences in runs of contiguous cache blocks, `blocks_per_seq` each: the block tables of the
/// decode checks.
struct ContiguousBlocks {
    block_size: usize,
    blocks_per_seq: usize,
    num_seqs: usize,
}

impl ContiguousBlocks {
    /// Room for each prompt and `more` tokens after it.
    fn for_prompts(prompts: &[Vec<u32>], more: usize, block_size: usize) -> Self {
        let blocks_per_seq = (prompts.iter().map(Vec::len).max().unwrap_or(1) + more).div_ceil(block_size);
        ContiguousBlocks { block_size, blocks_per_seq, num_seqs: prompts.len() }
    }

    fn num_blocks(&self) -> usize {
        self.blocks_per_seq * self.num_seqs
    }

    /// One batch: sequence `i`'s `tokens` at positions from `start` on, for each `(i, tokens, start)`.
    fn batch<'a>(&self, seqs: impl IntoIterator<Item = (usize, &'a [u32], usize)>) -> Result<ForwardBatch, CudaError> {
        let mut batch = ForwardBatch::new(self.block_size, self.num_blocks());
        for (i, tokens, start) in seqs {
            let table: Vec<u32> = ((i * self.blocks_per_seq) as u32..((i + 1) * self.blocks_per_seq) as u32).collect();
            batch.push_seq(tokens, start, &table, true).map_err(|e| CudaError::Config(e.to_string()))?;
        }
        Ok(batch)
    }

    /// Every prompt prefilled from position 0.
    fn prefill(&self, prompts: &[Vec<u32>]) -> Result<ForwardBatch, CudaError> {
        self.batch(prompts.iter().enumerate().map(|(i, p)| (i, p.as_slice(), 0)))
    }

    /// One decode token per sequence, sequence `i`'s `next[i]` at position `lens[i]`.
    fn decode(&self, next: &[u32], lens: &[usize]) -> Result<ForwardBatch, CudaError> {
        self.batch(next.iter().zip(lens).enumerate().map(|(i, (token, &len))| (i, std::slice::from_ref(token), len)))
    }
}

/// The greedy token of each `vocab`-wide row of `logits`.
fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits.chunks(vocab).map(|row| crate::sampling::argmax(row) as u32).collect()
}

/// The tensor-parallel path on one GPU: the model joined to an NCCL group of one
/// (`GpuTensorParallelBackend`: every all-reduce and the logits' all-gather go through NCCL, the
/// embedding through its vocabulary range, the logits through `gather_vocab_ranges`, the decode
/// graphs captured with the collectives inside) against the plain backend, both through graphs.
/// A group of one sums and gathers nothing, so the logits must be the same bits. A GPU cannot hold
/// two ranks of one NCCL group, so worlds above one need a machine with more GPUs.
pub fn check_tensor_parallel_nccl(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<CheckRow>, CudaError> {
    use crate::cuda::collective::{self, RankComm};
    use crate::runner::ModelBackend;
    if !collective::is_available() {
        return Ok(vec![CheckRow { name: "tensor parallel, NCCL".into(), detail: "skipped: libnccl.so not found".into(), error: None, passed: true }]);
    }
    let prompts = &prompts[..prompts.len().min(3)];
    let blocks = ContiguousBlocks::for_prompts(prompts, steps + 1, 16);
    let (num_blocks, block_size, max_context) = (blocks.num_blocks(), blocks.block_size, blocks.blocks_per_seq * blocks.block_size);
    let mut plain = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size)?;
    plain.prepare_for_serving(true, prompts.len(), max_context)?;
    let comm = RankComm::group(std::slice::from_ref(dev))?.remove(0);
    let rank = GpuModel::from_cpu(dev.clone(), cpu_model)?.with_collective(Arc::new(comm))?;
    let mut tp = crate::cuda::GpuTensorParallelBackend::new(cpu_model.config().clone(), vec![rank], num_blocks, block_size, crate::kv_cache::KvCacheDtype::Auto)?;
    let captured = tp.prepare_for_serving(true, prompts.len(), max_context)?;
    let model_error = |e: crate::model::ModelError| CudaError::Config(e.to_string());
    let prefill = blocks.prefill(prompts)?;
    let vocab = cpu_model.config().vocab_size;
    let (want, got) = (plain.forward_logits_via_graphs(&prefill)?, tp.forward(&prefill).map_err(model_error)?);
    let mut worst = relative_error(&got, &want);
    let mut next = argmax_rows(&got, vocab);
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let (mut agreed, mut total) = (0, 0);
    for _ in 0..steps {
        let batch = blocks.decode(&next, &lens)?;
        let (want, got) = (plain.forward_logits_via_graphs(&batch)?, tp.forward(&batch).map_err(model_error)?);
        worst = worst.max(relative_error(&got, &want));
        let (want_tokens, got_tokens) = (argmax_rows(&want, vocab), argmax_rows(&got, vocab));
        total += want_tokens.len();
        agreed += want_tokens.iter().zip(&got_tokens).filter(|(a, b)| a == b).count();
        next = got_tokens;
        lens.iter_mut().for_each(|l| *l += 1);
    }
    Ok(vec![CheckRow {
        name: "tensor parallel, NCCL world 1".into(),
        detail: format!(
            "NCCL {}; {captured} graphs; prefill and {agreed} of {total} decode tokens equal to the plain backend's; logits max relative error {worst:.1e}",
            collective::version()?
        ),
        error: Some(worst),
        passed: agreed == total && worst == 0.0,
    }])
}

/// Decode steps through captured CUDA graphs against the same steps launched kernel by kernel:
/// three sequences prefill, then decode `steps` tokens; each step runs eagerly and through its
/// bucket's graph (padded from 3 to 4 rows) on the same cache state, and the tokens must agree.
/// With `max_context`, the graphs are captured for that many positions, far more than the
/// sequences reach, so the steps must replay a graph of a shorter context tier
/// (`cuda::graphs`, whether or not the device serves with them); without, for the sequences' own
/// blocks, as the device serves.
pub fn check_graphs(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>], steps: usize, max_context: Option<usize>) -> Result<CheckRow, CudaError> {
    let prompts = &prompts[..prompts.len().min(3)];
    let blocks = ContiguousBlocks::for_prompts(prompts, steps + 1, 16);
    let mut gpu = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, blocks.num_blocks(), blocks.block_size)?;
    let captured_for = max_context.unwrap_or(blocks.blocks_per_seq * blocks.block_size);
    let captured = gpu.capture_decode_graphs_tiered(prompts.len(), captured_for, max_context.is_some() || dev.graph_tiers)?;
    let mut next = gpu.forward_argmax(&blocks.prefill(prompts)?)?;
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let (mut agreed, mut total) = (0, 0);
    let mut replayed = std::collections::BTreeSet::new();
    for _ in 0..steps {
        let batch = blocks.decode(&next, &lens)?;
        let eager = gpu.forward_argmax(&batch)?;
        replayed.extend(gpu.decode_graph_for(&batch));
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
    let shorter_tier = replayed.iter().any(|&(_, context)| context < captured_for);
    let replayed: Vec<String> = replayed.iter().map(|(bucket, context)| format!("{bucket} rows up to {context} positions")).collect();
    Ok(CheckRow {
        name: if max_context.is_some() { "cuda graphs, context tiers".into() } else { "cuda graphs".into() },
        detail: format!(
            "{captured} graphs captured for {captured_for} positions; replayed {}; {agreed} of {total} decode tokens equal to eager launches",
            replayed.join(", ")
        ),
        error: None,
        passed: agreed == total && (max_context.is_none() || shorter_tier),
    })
}

/// Weights loaded straight to the device (`GpuModel::load`, from the model's own source) against
/// the host model uploaded (`GpuModel::from_cpu`): both round the same values to bfloat16, so a
/// prefill of the prompts must give bit-identical logits.
pub fn check_direct_load(dev: &Arc<GpuDevice>, direct: GpuModel, cpu_model: &CpuModel, prompts: &[Vec<u32>]) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let blocks_per_seq = prompts.iter().map(Vec::len).max().unwrap_or(1).div_ceil(block_size);
    let num_blocks = blocks_per_seq * prompts.len();
    let mut batch = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate() {
        let table: Vec<u32> = ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect();
        batch.push_seq(p, 0, &table, true).map_err(|e| CudaError::Config(e.to_string()))?;
    }
    let mut loaded = GpuBackend::new(direct, num_blocks, block_size)?;
    let mut uploaded = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size)?;
    let (a, b) = (loaded.forward_logits(&batch)?, uploaded.forward_logits(&batch)?);
    let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    Ok(CheckRow {
        name: "weights straight to the device".into(),
        detail: format!("{} logits of {} prompts bit-identical to the host upload's", a.len(), prompts.len()),
        error: None,
        passed: same && !a.is_empty(),
    })
}

/// Device sampling of `rows` from host `logits` (`[num_rows, vocab]`), for the sampling checks.
fn sample_device(dev: &GpuDevice, logits: &[f32], vocab: usize, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, CudaError> {
    let on_device = dev.stream.clone_htod(logits)?;
    let mut buffers = SamplingBuffers::default();
    let ptr = cudarc::driver::DevicePtr::device_ptr(&on_device, &dev.stream).0;
    sample_on_device(dev, &mut buffers, ptr, logits.len() / vocab, vocab, rows, None).map(|(rows, _)| rows)
}

fn token_of(row: &SampledRow) -> Option<&Sampled> {
    match row {
        SampledRow::Token(s) => Some(s),
        SampledRow::Candidates { .. } => None,
    }
}

/// Random logits `[rows, vocab]`, uniform in [-8, 8); every third row rounded to halves, so it
/// has many exact ties (the lowest index must win them, as on the CPU).
fn random_logits(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
    for row in (0..rows).step_by(3) {
        for v in &mut logits[row * vocab..(row + 1) * vocab] {
            *v = (*v * 2.0).round() / 2.0;
        }
    }
    logits
}

/// Samplers for each parameter set, their state made to bite: the prompt and the output so far
/// hold the row's best tokens, so penalties move the argmax.
fn samplers_for(params: &[SamplingParams], logits: &[f32], vocab: usize) -> Vec<SequenceSampler> {
    params
        .iter()
        .enumerate()
        .map(|(row, p)| {
            let (ids, _) = crate::plugin::top_candidates(&logits[row * vocab..(row + 1) * vocab], 6);
            let mut s = SequenceSampler::new(p.clone(), &ids[..2], 0);
            for (k, &t) in ids[1..5].iter().enumerate() {
                for _ in 0..=k {
                    s.observe(t);
                }
            }
            s
        })
        .collect()
}

/// The device sampler against the CPU sampler's semantics (`kernels/sampling.cu` against
/// `sampling::SequenceSampler`): greedy tokens after bias and each penalty, collapse of tiny
/// top-p / min-p 1 to the argmax, raw log-probs and top-L within 1e-4, plugin candidates equal,
/// seeded draws reproducible and independent of batch position, the support of large-vocabulary
/// draws, and the distribution of 20,000 draws against the CPU's filtered probabilities.
pub fn sampling_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows_out = Vec::new();
    let mut rng = StdRng::seed_from_u64(17);
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let bias = |logits: &[f32], vocab: usize, row: usize| -> std::collections::BTreeMap<u32, f32> {
        let (ids, _) = crate::plugin::top_candidates(&logits[row * vocab..(row + 1) * vocab], 3);
        [(ids[0], -100.0), (ids[2], 0.75), (7, 3.0)].into()
    };
    // 50,257 is not a multiple of `greedy_chunks`' 2,048-logit chunk.
    for vocab in [49_152usize, 50_257, 151_936] {
        let n = 14;
        let logits = random_logits(&mut rng, n, vocab);
        let lp = |k| Some(k);
        let params: Vec<SamplingParams> = vec![
            SamplingParams { logprobs: lp(5), ..greedy.clone() },
            SamplingParams { logit_bias: bias(&logits, vocab, 1), logprobs: lp(1), ..greedy.clone() },
            SamplingParams { repetition_penalty: 1.8, logprobs: lp(0), ..greedy.clone() },
            SamplingParams { presence_penalty: 1.5, ..greedy.clone() },
            SamplingParams { frequency_penalty: 0.7, logprobs: lp(20), ..greedy.clone() },
            SamplingParams {
                logit_bias: bias(&logits, vocab, 5),
                repetition_penalty: 0.7,
                presence_penalty: -0.5,
                frequency_penalty: 0.3,
                logprobs: lp(20),
                ..greedy.clone()
            },
            SamplingParams { temperature: 1.0, top_k: 1, logprobs: lp(3), ..Default::default() },
            // Random rows that must collapse to the argmax after bias and penalties.
            SamplingParams { temperature: 1.0, top_p: 1e-6, seed: Some(1), ..Default::default() },
            SamplingParams { temperature: 0.5, min_p: 1.0, frequency_penalty: 1.0, seed: Some(2), ..Default::default() },
            SamplingParams { temperature: 1.3, top_k: 2, top_p: 1e-6, repetition_penalty: 1.5, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 0.8, top_p: 1e-6, logit_bias: bias(&logits, vocab, 10), seed: None, ..Default::default() },
            SamplingParams { temperature: 2.0, top_k: 1, presence_penalty: 2.0, logprobs: lp(2), ..Default::default() },
            // Plain greedy (`greedy_chunks`): row 12 has its best value hundreds of times over,
            // in every chunk, and the lowest index must win.
            greedy.clone(),
            greedy.clone(),
        ];
        assert_eq!(params.len(), n);
        let mut cpu = samplers_for(&params, &logits, vocab);
        let mut gpu = samplers_for(&params, &logits, vocab);
        // The CPU reference: its greedy choice after bias and penalties, and its log-probs.
        let want: Vec<(usize, Sampled)> = cpu
            .iter_mut()
            .enumerate()
            .map(|(row, s)| {
                let mut processed = logits[row * vocab..(row + 1) * vocab].to_vec();
                s.apply_bias_and_penalties(&mut processed);
                let argmax = crate::sampling::argmax(&processed);
                (argmax, s.sample(&mut logits[row * vocab..(row + 1) * vocab].to_vec()))
            })
            .collect();
        let mut rows: Vec<RowSampling> =
            gpu.iter_mut().enumerate().map(|(row, sampler)| RowSampling { row, sampler, candidates: None }).collect();
        let got = sample_device(dev, &logits, vocab, &mut rows)?;
        let (mut tokens_ok, mut worst) = (0, 0.0f64);
        let mut failures = Vec::new();
        for (i, ((argmax, cpu), got)) in want.iter().zip(&got).enumerate() {
            let Some(got) = token_of(got) else { continue };
            let greedy_row = params[i].is_greedy();
            if got.token as usize == *argmax && (!greedy_row || got.token == cpu.token) {
                tokens_ok += 1;
            } else {
                failures.push(format!("row {i}: got {} want {argmax}", got.token));
            }
            if params[i].logprobs.is_some() {
                let same_top = got.top.iter().map(|t| t.token).eq(cpu.top.iter().map(|t| t.token));
                let mut error = (got.logprob as f64 - cpu.logprob as f64).abs();
                for (g, c) in got.top.iter().zip(&cpu.top) {
                    error = error.max((g.logprob as f64 - c.logprob as f64).abs());
                }
                if !same_top || got.top.len() != cpu.top.len() || !error.is_finite() {
                    failures.push(format!("row {i}: top-L {:?} vs {:?}", got.top.len(), cpu.top.len()));
                    worst = f64::INFINITY;
                }
                worst = worst.max(error);
            } else if !got.logprob.is_nan() || !got.top.is_empty() {
                failures.push(format!("row {i}: log-probs not asked but returned"));
            }
        }
        rows_out.push(CheckRow {
            name: "sampling greedy".into(),
            detail: format!("V {vocab}: {tokens_ok}/{n} argmax after bias/penalties/collapse {failures:?}"),
            error: None,
            passed: tokens_ok == n && failures.is_empty(),
        });
        rows_out.push(CheckRow {
            name: "sampling logprobs".into(),
            detail: format!("V {vocab}: max |device - CPU| of chosen and top-L raw log-probs"),
            error: Some(worst),
            passed: worst < 1e-4,
        });

        // Only plain greedy samples (the one-client step: `sample_rows` is not launched), three
        // launches on the same buffers (each leaves its arrival counters at zero for the next),
        // every row once and row 12 (ties) twice.
        let want: Vec<u32> = (0..n).chain([12]).map(|row| crate::sampling::argmax(&logits[row * vocab..(row + 1) * vocab]) as u32).collect();
        let mut plain: Vec<SequenceSampler> = (0..=n).map(|i| SequenceSampler::new(greedy.clone(), &[], i as u64)).collect();
        let on_device = dev.stream.clone_htod(&logits)?;
        let logits_ptr = cudarc::driver::DevicePtr::device_ptr(&on_device, &dev.stream).0;
        let mut buffers = SamplingBuffers::default();
        let mut launches = Vec::new();
        for _ in 0..3 {
            let mut rows: Vec<RowSampling> = plain
                .iter_mut()
                .enumerate()
                .map(|(i, sampler)| RowSampling { row: if i == n { 12 } else { i }, sampler, candidates: None })
                .collect();
            let (got, _) = sample_on_device(dev, &mut buffers, logits_ptr, n, vocab, &mut rows, None)?;
            launches.push(got.iter().map(|g| token_of(g).map_or(u32::MAX, |s| s.token)).collect::<Vec<u32>>());
        }
        let same = launches.iter().filter(|got| **got == want).count();
        rows_out.push(CheckRow {
            name: "sampling greedy, chunked".into(),
            detail: format!("V {vocab}: {same}/3 launches of {} plain greedy samples equal to the CPU argmax", n + 1),
            error: None,
            passed: same == 3,
        });

        // Plugin candidates: the same ids in the same order, the same processed logits.
        let cand_params: Vec<SamplingParams> = (0..n).map(|i| params[i % 6].clone()).collect();
        let mut cpu = samplers_for(&cand_params, &logits, vocab);
        let mut gpu = samplers_for(&cand_params, &logits, vocab);
        let top_n = [1usize, 5, 64, 1024];
        let mut cpu_rows: Vec<RowSampling> = cpu
            .iter_mut()
            .enumerate()
            .map(|(row, sampler)| RowSampling { row, sampler, candidates: Some(top_n[row % 4]) })
            .collect();
        let want = crate::sampling::sample_rows_host(&logits, vocab, &mut cpu_rows);
        let mut gpu_rows: Vec<RowSampling> = gpu
            .iter_mut()
            .enumerate()
            .map(|(row, sampler)| RowSampling { row, sampler, candidates: Some(top_n[row % 4]) })
            .collect();
        let got = sample_device(dev, &logits, vocab, &mut gpu_rows)?;
        let equal = want.iter().zip(&got).filter(|(w, g)| w == g).count();
        rows_out.push(CheckRow {
            name: "sampling candidates".into(),
            detail: format!("V {vocab}: {equal}/{n} rows of top-N (1..1024) equal to the CPU's, ties included"),
            error: None,
            passed: equal == n,
        });
    }

    // Seeded draws: the same in two runs, and the same alone as in a batch of others.
    let vocab = 49_152;
    let n = 32;
    let logits = random_logits(&mut rng, n, vocab);
    let params: Vec<SamplingParams> = (0..n)
        .map(|i| SamplingParams {
            temperature: [0.5, 0.8, 1.0, 1.5][i % 4],
            top_k: [0, 40, 0, 1000][i % 4],
            top_p: [1.0, 0.9, 0.95, 1.0][(i / 4) % 4],
            min_p: [0.0, 0.05][(i / 2) % 2],
            seed: Some(1000 + i as u64),
            ..Default::default()
        })
        .collect();
    let run = |order: &[usize]| -> Result<Vec<u32>, CudaError> {
        let mut samplers: Vec<SequenceSampler> = order.iter().map(|&i| SequenceSampler::new(params[i].clone(), &[], 0)).collect();
        let mut rows: Vec<RowSampling> =
            samplers.iter_mut().zip(order).map(|(sampler, &row)| RowSampling { row, sampler, candidates: None }).collect();
        let got = sample_device(dev, &logits, vocab, &mut rows)?;
        let mut tokens = vec![0u32; n];
        for (&i, r) in order.iter().zip(&got) {
            tokens[i] = token_of(r).map_or(u32::MAX, |s| s.token);
        }
        Ok(tokens)
    };
    let forward: Vec<usize> = (0..n).collect();
    let reversed: Vec<usize> = (0..n).rev().collect();
    let first = run(&forward)?;
    let again = run(&forward)?;
    let shuffled = run(&reversed)?;
    let mut alone = Vec::new();
    for i in 0..n {
        alone.push(run(&[i])?[i]);
    }
    let distinct = first.iter().collect::<std::collections::HashSet<_>>().len();
    rows_out.push(CheckRow {
        name: "sampling seeded".into(),
        detail: format!("{n} seeded rows: same in a second run, in reverse order and alone ({distinct} distinct tokens)"),
        error: None,
        passed: first == again && first == shuffled && first == alone,
    });

    // Large vocabulary: every draw inside the CPU's support (top-k, top-p, min-p cuts).
    let support_params = [
        SamplingParams { temperature: 0.8, top_k: 50, ..Default::default() },
        SamplingParams { temperature: 1.0, top_p: 0.8, ..Default::default() },
        SamplingParams { temperature: 1.2, min_p: 0.1, ..Default::default() },
        SamplingParams { temperature: 0.7, top_k: 200, top_p: 0.9, min_p: 0.02, ..Default::default() },
    ];
    let draws = 512;
    let logits = random_logits(&mut rng, support_params.len(), vocab);
    let mut outside = 0;
    let mut support_sizes = Vec::new();
    for (row, p) in support_params.iter().enumerate() {
        let reference = SequenceSampler::new(p.clone(), &[], 0);
        let support: std::collections::HashSet<usize> =
            reference.filtered(&logits[row * vocab..(row + 1) * vocab]).iter().map(|c| c.0).collect();
        support_sizes.push(support.len());
        let mut samplers: Vec<SequenceSampler> =
            (0..draws).map(|i| SequenceSampler::new(SamplingParams { seed: Some(i as u64), ..p.clone() }, &[], 0)).collect();
        let mut rows: Vec<RowSampling> = samplers.iter_mut().map(|sampler| RowSampling { row, sampler, candidates: None }).collect();
        let got = sample_device(dev, &logits, vocab, &mut rows)?;
        outside += got.iter().filter(|r| token_of(r).is_none_or(|s| !support.contains(&(s.token as usize)))).count();
    }
    rows_out.push(CheckRow {
        name: "sampling support".into(),
        detail: format!("V {vocab}: {outside} of {} draws outside the CPU's kept sets (sizes {support_sizes:?})", draws * 4),
        error: None,
        passed: outside == 0,
    });

    rows_out.extend(masked_sampling_checks(dev, &mut rng)?);

    // The distribution: 20,000 draws of an 8-token vocabulary against the CPU's probabilities.
    let logits = [2.0f32, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0];
    let configs = [
        ("T 0.7", SamplingParams { temperature: 0.7, ..Default::default() }),
        ("top-k 5", SamplingParams { top_k: 5, ..Default::default() }),
        ("top-p 0.9", SamplingParams { top_p: 0.9, ..Default::default() }),
        ("min-p 0.05", SamplingParams { temperature: 1.5, min_p: 0.05, ..Default::default() }),
        (
            "all four",
            SamplingParams { temperature: 0.7, top_k: 5, top_p: 0.9, min_p: 0.05, ..Default::default() },
        ),
    ];
    for (label, p) in configs {
        rows_out.push(check_distribution(dev, &logits, label, &p, 20_000)?);
    }
    Ok(rows_out)
}

/// Constrained samples (a structured-output grammar's or a constraint plugin's mask, uploaded as a
/// bitmask): greedy tokens equal to the CPU's masked argmax (with bias and penalties too), every
/// seeded draw inside the mask, and plugin candidates equal to the CPU's, cut to the allowed ones.
fn masked_sampling_checks(dev: &GpuDevice, rng: &mut StdRng) -> Result<Vec<CheckRow>, CudaError> {
    use llguidance::toktrie::SimpleVob;
    let vocab = 49_152;
    let n = 16;
    let logits = random_logits(rng, n, vocab);
    // Masks: sparse random ones, one token only, everything but the row's argmax, the low ids.
    let masks: Vec<SimpleVob> = (0..n)
        .map(|row| {
            let mut vob = SimpleVob::alloc(vocab);
            match row % 4 {
                0 => (0..vocab).filter(|_| rng.random_bool(0.01)).for_each(|t| vob.allow_token(t as u32)),
                1 => vob.allow_token(rng.random_range(0..vocab as u32)),
                2 => {
                    vob.allow_range(0..=vocab as u32 - 1);
                    vob.disallow_token(crate::sampling::argmax(&logits[row * vocab..(row + 1) * vocab]) as u32);
                }
                _ => vob.allow_range(0..=63),
            }
            vob
        })
        .collect();
    let params: Vec<SamplingParams> = (0..n)
        .map(|row| match row / 4 {
            0 => SamplingParams { temperature: 0.0, ..Default::default() },
            1 => SamplingParams { temperature: 0.0, frequency_penalty: 1.0, logit_bias: [(5, 4.0)].into(), ..Default::default() },
            2 => SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(row as u64), ..Default::default() },
            _ => SamplingParams { temperature: 0.7, top_k: 20, min_p: 0.01, seed: Some(row as u64), ..Default::default() },
        })
        .collect();
    let samplers = || -> Vec<SequenceSampler> {
        samplers_for(&params, &logits, vocab)
            .into_iter()
            .zip(&masks)
            .map(|(s, mask)| {
                let mut constraint = crate::constraint::Constraint::plugin("check", "", 0);
                constraint.set_allowed(mask.clone());
                s.with_constraint(Some(constraint))
            })
            .collect()
    };
    let (mut cpu, mut gpu) = (samplers(), samplers());
    let want: Vec<Sampled> =
        cpu.iter_mut().enumerate().map(|(row, s)| s.sample(&mut logits[row * vocab..(row + 1) * vocab].to_vec())).collect();
    let mut rows: Vec<RowSampling> = gpu.iter_mut().enumerate().map(|(row, sampler)| RowSampling { row, sampler, candidates: None }).collect();
    let got = sample_device(dev, &logits, vocab, &mut rows)?;
    let mut failures = Vec::new();
    for (row, (w, g)) in want.iter().zip(&got).enumerate() {
        let Some(g) = token_of(g) else {
            failures.push(format!("row {row}: no token"));
            continue;
        };
        if !masks[row].is_allowed(g.token) {
            failures.push(format!("row {row}: token {} outside the mask", g.token));
        } else if params[row].is_greedy() && g.token != w.token {
            failures.push(format!("row {row}: got {} want {}", g.token, w.token));
        }
    }
    let mut out = vec![CheckRow {
        name: "sampling masked".into(),
        detail: format!("V {vocab}: {n} constrained rows (greedy = CPU, draws inside the mask) {failures:?}"),
        error: None,
        passed: failures.is_empty(),
    }];
    let (mut cpu, mut gpu) = (samplers(), samplers());
    fn candidates(samplers: &mut [SequenceSampler]) -> Vec<RowSampling<'_>> {
        samplers.iter_mut().enumerate().map(|(row, sampler)| RowSampling { row, sampler, candidates: Some(16) }).collect()
    }
    let want = crate::sampling::sample_rows_host(&logits, vocab, &mut candidates(&mut cpu));
    let got = sample_device(dev, &logits, vocab, &mut candidates(&mut gpu))?;
    let equal = want.iter().zip(&got).filter(|(w, g)| w == g).count();
    out.push(CheckRow {
        name: "sampling masked candidates".into(),
        detail: format!("V {vocab}: {equal}/{n} rows of top-16 candidates under a mask equal to the CPU's"),
        error: None,
        passed: equal == n,
    });
    Ok(out)
}

/// `draws` seeded draws from one row against the CPU sampler's filtered probabilities: no draw
/// outside its kept set, Pearson's chi-square under the 0.1% critical value, and every frequency
/// within 0.01 of its probability.
fn check_distribution(dev: &GpuDevice, logits: &[f32], label: &str, p: &SamplingParams, draws: usize) -> Result<CheckRow, CudaError> {
    let vocab = logits.len();
    let kept = SequenceSampler::new(p.clone(), &[], 0).filtered(logits);
    let total: f64 = kept.iter().map(|c| c.1 as f64).sum();
    let mut probability = vec![0.0f64; vocab];
    for &(token, weight) in &kept {
        probability[token] = weight as f64 / total;
    }
    let mut samplers: Vec<SequenceSampler> =
        (0..draws).map(|i| SequenceSampler::new(SamplingParams { seed: Some(i as u64 * 7919), ..p.clone() }, &[], 0)).collect();
    let mut rows: Vec<RowSampling> = samplers.iter_mut().map(|sampler| RowSampling { row: 0, sampler, candidates: None }).collect();
    let got = sample_device(dev, logits, vocab, &mut rows)?;
    let mut counts = vec![0usize; vocab];
    for r in &got {
        if let Some(s) = token_of(r) {
            counts[(s.token as usize).min(vocab - 1)] += 1;
        }
    }
    let outside: usize = (0..vocab).filter(|&t| probability[t] == 0.0).map(|t| counts[t]).sum();
    let (mut chi2, mut max_error) = (0.0f64, 0.0f64);
    for t in (0..vocab).filter(|&t| probability[t] > 0.0) {
        let expected = probability[t] * draws as f64;
        chi2 += (counts[t] as f64 - expected).powi(2) / expected;
        max_error = max_error.max((counts[t] as f64 / draws as f64 - probability[t]).abs());
    }
    // Chi-square critical values at p = 0.001 for 1..=7 degrees of freedom.
    const CRITICAL: [f64; 8] = [f64::INFINITY, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32];
    let df = kept.len().saturating_sub(1).min(7);
    let passed = outside == 0 && chi2 < CRITICAL[df] && max_error < 0.01;
    Ok(CheckRow {
        name: "sampling distribution".into(),
        detail: format!(
            "{label}: {draws} draws over {} tokens, chi2 {chi2:.1} (df {df}), {outside} outside",
            kept.len()
        ),
        error: Some(max_error),
        passed,
    })
}

/// The serving engine on the GPU backend, greedy requests (the reference prompts, all at once,
/// one of them with `n = 2`, one seeded and sampled instead), run without decode CUDA graphs, with them, and with them and async
/// scheduling (steps pipelined, decode tokens fed on the device): the tokens must agree.
pub fn check_engine_graphs(
    dev: &Arc<GpuDevice>,
    cpu_model: &CpuModel,
    tokenizer: Arc<crate::tokenizer::Tokenizer>,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<CheckRow, CudaError> {
    let block_size = 16;
    let max_model_len = prompts.iter().map(Vec::len).max().unwrap_or(1) + max_tokens + 1;
    let num_blocks = (prompts.len() + 1) * max_model_len.div_ceil(block_size) * 2;
    let mut outputs = Vec::new();
    for (graphs, pipelined) in [(false, false), (true, false), (true, true)] {
        let mut backend = GpuBackend::new(GpuModel::from_cpu(dev.clone(), cpu_model)?, num_blocks, block_size)?;
        if graphs {
            backend.capture_decode_graphs(prompts.len() + 1, max_model_len)?;
        }
        let policy = crate::sched::native_policy("fcfs").expect("built-in policy");
        let scheduler = crate::sched::Scheduler::new(
            // A budget of 16 tokens a step: the prompts are prefilled in chunks, so steps with
            // nothing to sample run between (and, pipelined, ahead of) the decode steps.
            crate::sched::SchedulerConfig::new(64, 16),
            policy,
        );
        let metrics = Arc::new(crate::metrics::Metrics::new("check"));
        let mut engine = crate::engine::EngineCore::new(Box::new(backend), tokenizer.clone(), metrics, scheduler, true, max_model_len);
        engine.set_async_scheduling(pipelined);
        let mut receivers = Vec::new();
        for (id, prompt) in prompts.iter().enumerate() {
            let mut request = crate::engine::GenerateRequest::greedy(prompt.clone(), max_tokens);
            request.ignore_eos = true;
            request.n = if id == 0 { 2 } else { 1 };
            // One seeded sampled request: its draws depend on each sampler's step count, which a
            // pipelined launch must advance past the token still in flight.
            if id == 1 {
                request.sampling = crate::sampling::SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(7), ..Default::default() };
            }
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            engine.add_request(id as u64, request, tx);
            receivers.push(rx);
        }
        let mut steps = 0;
        while engine.has_work() && steps < 10_000 {
            engine.step();
            steps += 1;
        }
        let mut tokens: Vec<Vec<Vec<u32>>> = Vec::new();
        for mut rx in receivers {
            let mut samples = vec![Vec::new(); 2];
            while let Ok(event) = rx.try_recv() {
                match event {
                    crate::engine::StreamEvent::Delta { index, token_ids, .. } => samples[index].extend(token_ids),
                    crate::engine::StreamEvent::Error(e) => return Err(CudaError::Config(format!("engine error: {e}"))),
                    _ => {}
                }
            }
            tokens.push(samples);
        }
        outputs.push(tokens);
    }
    let total: usize = outputs[0].iter().flatten().map(Vec::len).sum();
    let complete = outputs.iter().all(|o| o.iter().enumerate().all(|(i, s)| s[0].len() == max_tokens && (i > 0 || s[1] == s[0])));
    Ok(CheckRow {
        name: "engine graphs".into(),
        detail: format!(
            "{} requests through the engine (one n=2, one seeded sampling), {total} tokens: graphs on {} graphs off, pipelined {} one at a time",
            prompts.len(),
            if outputs[0] == outputs[1] { "==" } else { "!=" },
            if outputs[2] == outputs[1] { "==" } else { "!=" },
        ),
        error: None,
        passed: outputs[0] == outputs[1] && outputs[1] == outputs[2] && complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rope_is_rotate_half_on_deinterleaved_dimensions() {
        // Interleaved pair (2i, 2i+1) is rotate-half's pair (i, i + hd/2) once the even dimensions
        // are moved to the first half and the odd ones to the second.
        let hd = 8;
        let mut rng = StdRng::seed_from_u64(1);
        let x = random_bf16_values(&mut rng, 2 * hd, 1.0);
        let inv_freq = default_inv_freq(hd);
        let (cos, sin) = cos_sin(&inv_freq, 1234);
        let mut interleaved = x.clone();
        rope_interleaved(&mut interleaved, hd, &cos, &sin);
        let permute = |v: &[f32]| -> Vec<f32> {
            v.chunks_exact(hd).flat_map(|h| h.iter().step_by(2).chain(h.iter().skip(1).step_by(2)).copied().collect::<Vec<_>>()).collect()
        };
        let mut half = permute(&x);
        Rope::apply(&mut half, hd, &cos, &sin);
        assert_eq!(permute(&interleaved), half);
        // Position 0 is the identity; any position keeps each pair's length.
        let mut same = x.clone();
        let (cos, sin) = cos_sin(&inv_freq, 0);
        rope_interleaved(&mut same, hd, &cos, &sin);
        assert_eq!(same, x);
        for (a, b) in interleaved.chunks_exact(2).zip(x.chunks_exact(2)) {
            assert!(((a[0] * a[0] + a[1] * a[1]) - (b[0] * b[0] + b[1] * b[1])).abs() < 1e-5);
        }
    }

    #[test]
    fn relative_error_is_zero_on_equal_and_infinite_on_nan() {
        assert_eq!(relative_error(&[1.0, -2.0], &[1.0, -2.0]), 0.0);
        assert!((relative_error(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
        assert_eq!(relative_error(&[f32::NAN, 0.0], &[1.0, 0.0]), f64::INFINITY);
    }
}
