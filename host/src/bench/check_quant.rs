//! `pagedserve check`'s rows for weights kept quantized on the device.
//!
//! GGUF blocks kept quantized (`--keep-quantized`: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K): the GEMV
//! from the blocks (up to 8 rows, each input staging) and the tiled path (dequantized bf16 tiles
//! and cuBLAS, more rows) against the CPU product with the CPU's dequantization of the same blocks
//! (`model::gguf`), within `TOLERANCE`; the GEMV's reference input is quantized per 32 values as
//! the kernel quantizes it. A real GGUF file's forward with its weights kept quantized against the
//! CPU forward of the same file (`check_forward_kept`).
//!
//! FP8 (sm_89 and newer): each FP8 kernel against `model::fp8`, the CPU format, on random inputs,
//! and the forward of a model whose projections are quantized on the device against the CPU
//! forward of the same FP8 weights (`CpuModel::with_fp8_projections`).
//!
//! - Quantization on the device must give the CPU's bytes and scales exactly.
//! - The FP8 GEMV (weights E4M3, input bf16) computes what the CPU computes with the dequantized
//!   weights: `TOLERANCE`, as every bf16 kernel.
//! - cuBLASLt's FP8 GEMM also quantizes its input per token: the reference quantizes it the same
//!   way on the CPU, so again only accumulation order and the output's rounding differ.
//! - The forward: where the GEMV runs every projection (one row, or a few rows of a small
//!   model's weights) it is weight-only FP8, as the CPU reference, and must be within
//!   `FORWARD_TOLERANCE`; where the GEMM runs (prefill, larger batches) it also quantizes each
//!   product's input, which the CPU reference does not: held to `W8A8_FORWARD_TOLERANCE`, with
//!   the rows whose greedy token agrees reported. A decode step after such a prefill attends to
//!   the keys and values that prefill wrote, so it carries the prefill's input quantization and is
//!   held to the same tolerance (seen on the H200: Gemma 3's and Qwen 3's fixtures 4.0e-2 to
//!   6.1e-2 at decode after 6.6e-2 and 8.0e-2 at prefill; Llama's 2.7e-2 after 4.1e-2).

use std::sync::Arc;

use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::check::{as_read_by, device_weight, download_bf16, matmul_reference, random_bf16_values, relative_error, to_bf16, CheckRow, FORWARD_TOLERANCE};
use crate::cuda::fp8_gemm::{fp8_linear, Fp8Product};
use crate::cuda::gemm::{ggml_linear, mmq_runs, OutType};
use crate::cuda::gemv::{gemv, Gemv, GemvInput};
use crate::cuda::launch::{gemv_prefers, mmq_plan, mmq_supports, WeightFormat};
use crate::cuda::weights::MatrixData;
use crate::cuda::{ptr, CudaError, GpuBackend, GpuDevice, GpuModel};
use crate::model::cpu::CpuModel;
use crate::model::fp8::Fp8Matrix;
use crate::model::gguf::GgmlType;
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};

/// The logits of a forward whose products quantize their inputs (to FP8, or to int8 from GGUF
/// blocks) against a CPU forward that does not (seen: 4e-2 at most on the 2-layer fixture, H200).
pub const W8A8_FORWARD_TOLERANCE: f64 = 0.1;

/// Whether this GPU runs FP8 (sm_89 on).
pub fn supported(dev: &GpuDevice) -> bool {
    dev.compute_capability() >= 89
}

fn config_err(e: impl std::fmt::Display) -> CudaError {
    CudaError::Config(e.to_string())
}

/// Random rows of very different magnitudes (one of zeros) quantized on the device, against
/// `Fp8Matrix::quantize` of the same bf16 values: bytes and scales identical.
pub fn check_quantize(
    dev: &GpuDevice,
    rows: usize,
    cols: usize,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = random_bf16_values(&mut rng, rows * cols, 1.0);
    for (r, row) in w.chunks_exact_mut(cols).enumerate() {
        let magnitude = [1.0f32, 1e-3, 37.0, 0.0, 1e-30][r % 5];
        row.iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v * magnitude).to_f32());
    }
    let (matrix, _) = device_weight(dev, &w, rows, cols, WeightFormat::Fp8)?;
    let MatrixData::Fp8 { values, scales } = &matrix.data else { unreachable!("quantized by device_weight") };
    let (got_bytes, got_scales) = (dev.stream.clone_dtoh(values)?, dev.stream.clone_dtoh(scales)?);
    let want = Fp8Matrix::quantize(&w, rows, cols).map_err(config_err)?;
    let wrong_bytes = got_bytes
        .iter()
        .zip(&want.bytes)
        .filter(|(a, b)| a != b)
        .count();
    let wrong_scales = got_scales
        .iter()
        .zip(&want.scales)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    Ok(CheckRow {
        name: "fp8 quantize".into(),
        detail: format!("[{rows}, {cols}]: {wrong_bytes} bytes and {wrong_scales} scales differ from the CPU's"),
        error: None,
        passed: wrong_bytes == 0 && wrong_scales == 0,
    })
}

/// The FP8 GEMV (`m` ≤ 8) or cuBLASLt's FP8 GEMM against the CPU product of the dequantized
/// weight (and, for the GEMM, the per-token quantized input).
pub fn check_product(
    dev: &GpuDevice,
    m: usize,
    n: usize,
    k: usize,
    gemm: bool,
    seed: u64,
) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, m * k, 1.0);
    let w = random_bf16_values(&mut rng, n * k, 0.1);
    let (w_dev, w_values) = device_weight(dev, &w, n, k, WeightFormat::Fp8)?;
    let x_reference = if gemm { Fp8Matrix::quantize(&x, m, k) .map_err(config_err)? .dequantize() } else { x.clone() };
    let want = matmul_reference(&x_reference, &w_values, None, m, k, n);
    let stream = &dev.stream;
    let x_dev = stream.clone_htod(&to_bf16(&x))?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let MatrixData::Fp8 { values, scales } = &w_dev.data else { unreachable!("quantized by device_weight") };
    if gemm {
        let (input_fp8, input_scales) = (stream.alloc_zeros::<u8>(m * k)?, stream.alloc_zeros::<f32>(m)?);
        let p = Fp8Product {
            out: ptr(dev, &out),
            input: ptr(dev, &x_dev),
            weight: ptr(dev, values),
            weight_scales: ptr(dev, scales),
            input_fp8: ptr(dev, &input_fp8),
            input_scales: ptr(dev, &input_scales),
            m,
            k,
            n,
        };
        // SAFETY: every buffer is allocated above at the size `Fp8Product` documents.
        unsafe { fp8_linear(dev, &p)? };
    } else {
        let g = Gemv {
            out: ptr(dev, &out),
            out_type: OutType::Bf16,
            input: GemvInput::Plain(ptr(dev, &x_dev)),
            w: w_dev.weight(dev),
            bias: 0,
            m,
            k,
            n,
        };
        // SAFETY: as above.
        unsafe { gemv(dev, &g)? };
    }
    let got = download_bf16(dev, &out, m * n)?;
    let scaling = match (gemm, dev.fp8_gemm().outer_vector_scales()) {
        (false, _) => "",
        (true, Some(true)) => ", scales in the GEMM",
        (true, _) => ", scales after the GEMM",
    };
    let name = if gemm { "fp8 cuBLASLt" } else { "fp8 gemv" };
    Ok(CheckRow::error(name, format!("m {m} n {n} k {k}{scaling}"), relative_error(&got, &want)))
}

/// The product of `m` rows by random `ty` blocks: through the GEMV (`tile_rows` 0), else through
/// `ggml_linear` with a scratch tile of `tile_rows` rows: MMQ where it takes the product, else
/// dequantized tiles and cuBLAS. The GEMV and MMQ read the input as int8 per 32 values, and so
/// does the reference for them (see `as_read_by`).
pub fn check_ggml_product(dev: &GpuDevice, ty: GgmlType, m: usize, n: usize, k: usize, tile_rows: usize, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let format = WeightFormat::Ggml(ty);
    let x = random_bf16_values(&mut rng, m * k, 1.0);
    let (w_dev, w_values) = device_weight(dev, &[seed as f32], n, k, format)?;
    let mmq = tile_rows > 0 && mmq_runs(dev, ty, m, k, tile_rows * k);
    let mut x_read = x.clone();
    if tile_rows == 0 || mmq {
        as_read_by(format, &mut x_read);
    }
    let want = matmul_reference(&x_read, &w_values, None, m, k, n);
    let stream = &dev.stream;
    let x_dev = stream.clone_htod(&to_bf16(&x))?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let weight = w_dev.weight(dev);
    let path = if tile_rows == 0 {
        let g = Gemv { out: ptr(dev, &out), out_type: OutType::Bf16, input: GemvInput::Plain(ptr(dev, &x_dev)), w: weight, bias: 0, m, k, n };
        // SAFETY: every buffer is allocated above at the size `Gemv` documents.
        unsafe { gemv(dev, &g)? };
        "gemv".to_string()
    } else {
        let tile = stream.alloc_zeros::<bf16>(tile_rows * k)?;
        let crate::cuda::gemv::GemvWeight::Ggml { blocks, .. } = weight else { unreachable!("a GGUF weight") };
        // SAFETY: as above; the tile holds `tile_rows` rows of `k`.
        unsafe { ggml_linear(dev, ptr(dev, &out), OutType::Bf16, ptr(dev, &x_dev), (ty, blocks), (ptr(dev, &tile), tile_rows * k), m, k, n)? };
        if mmq {
            let split = mmq_plan(m, k, n, 2 * tile_rows * k, 2 * dev.num_sms);
            format!("mmq, {} splits of {} super-blocks", split.splits, split.per_split)
        } else {
            format!("tiles of {tile_rows} rows")
        }
    };
    let got = download_bf16(dev, &out, m * n)?;
    Ok(CheckRow::error(&format!("{ty:?} linear").to_lowercase(), format!("m {m} n {n} k {k}, {path}"), relative_error(&got, &want)))
}

/// Every row of the GGUF types kept quantized: for each type the GEMV at 1, 2, 3 and 8 rows
/// (SmolLM2-like widths, and the Llama-3.1-8B ones at one row for Q4_K and Q6_K, the types of
/// Q4_K_M files), each fused staging, the tiled path with a partial last tile, and one input row
/// at wider rows in each staging.
pub fn ggml_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    let mut seed = 500;
    for ty in WeightFormat::KEPT_GGML {
        let format = WeightFormat::Ggml(ty);
        // The narrowest width in whole blocks near SmolLM2's 576 (512 for the 256-value K-quants).
        let narrow = if ty.block_size() == 256 { 512 } else { 576 };
        let mut next = || {
            seed += 1;
            seed
        };
        for (m, n) in [(1, 960), (2, 1001), (3, 576), (8, 3072)] {
            rows.push(check_ggml_product(dev, ty, m, n, narrow, 0, next())?);
        }
        if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
            for (m, n, k) in [(1, 6144, 4096), (1, 4096, 14336), (8, 4096, 14336)] {
                rows.push(check_ggml_product(dev, ty, m, n, k, 0, next())?);
            }
        }
        // 9 rows: MMQ where k is whole 256-value stages (K-quants), tiles otherwise.
        rows.push(check_ggml_product(dev, ty, 9, 1001, 2 * narrow, 300, next())?);
        if mmq_supports(ty, 16, 256) {
            // MMQ with splits of k: 4 even ones; 2 over a partial last block of rows and tokens;
            // for Q4_K also none (132 full blocks), and 5 with a short last one.
            let mut shapes = vec![(16, 960, 4096, 64), (33, 3000, 2048, 300)];
            if ty == GgmlType::Q4_K {
                shapes.extend([(64, 8448, 1024, 64), (40, 4096, 14336, 200)]);
            }
            for (m, n, k, tile_rows) in shapes {
                rows.push(check_ggml_product(dev, ty, m, n, k, tile_rows, next())?);
            }
        }
        rows.push(check_ggml_product(dev, ty, 72, 960, narrow, 960, next())?);
        rows.push(super::check::check_gemv_silu(dev, 1, 576, 3 * narrow, format, next())?);
        rows.push(super::check::check_gemv_silu(dev, 5, 1001, 3 * narrow, format, next())?);
        for (m, n, with_bias, indirect) in [(1, 960, false, false), (4, 3072, true, false), (2, 4000, false, true)] {
            rows.push(super::check::check_gemv_norm(dev, m, n, 2 * narrow, true, indirect, with_bias, format, next())?);
        }
        rows.push(super::check::check_gemv_merge(dev, 1001, 2 * narrow / 128, 128, 9, 4, format, next())?);
        // One input row at widths of whole 2048 values, as the 8B's (4096, 14336), in every
        // staging: rows spread unevenly over the warps (1001), rows of several of a warp's chunks.
        let wide = 2048;
        rows.push(check_ggml_product(dev, ty, 1, 1001, wide, 0, next())?);
        rows.push(check_ggml_product(dev, ty, 1, 5000, 3 * wide, 0, next())?);
        rows.push(super::check::check_gemv_silu(dev, 1, 1001, 2 * wide, format, next())?);
        rows.push(super::check::check_gemv_norm(dev, 1, 1001, wide, true, false, true, format, next())?);
        rows.push(super::check::check_gemv_norm(dev, 1, 600, 2 * wide, true, true, false, format, next())?);
        rows.push(super::check::check_gemv_merge(dev, 1001, wide / 128, 128, 9, 4, format, next())?);
    }
    Ok(rows)
}

/// Every FP8 kernel row; none before sm_89.
pub fn fp8_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    if !supported(dev) {
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    for (r, c, seed) in [(5, 576, 400), (100, 4096, 401), (7, 14336, 402)] {
        rows.push(check_quantize(dev, r, c, seed)?);
    }
    let mut seed = 410;
    for (n, k) in [(960, 576), (3072, 576), (576, 1536), (1001, 1024)] {
        for m in [1, 2, 3, 8] {
            seed += 1;
            rows.push(check_product(dev, m, n, k, false, seed)?);
        }
    }
    for (m, n, k) in [(1, 6144, 4096), (1, 4096, 14336), (2, 28672, 4096), (2, 4096, 14336)] {
        seed += 1;
        rows.push(check_product(dev, m, n, k, false, seed)?);
    }
    for (m, n, k) in [(3, 960, 576), (16, 576, 1536), (64, 3072, 576), (300, 960, 576), (64, 6144, 4096), (16, 4096, 14336), (9, 1008, 4096)] {
        seed += 1;
        rows.push(check_product(dev, m, n, k, true, seed)?);
    }
    for m in [1, 2, 8] {
        rows.push(super::check::check_gemv_silu(dev, m, 576, 1536, WeightFormat::Fp8, 430 + m as u64)?);
    }
    rows.push(super::check::check_gemv_silu(dev, 1, 4096, 14336, WeightFormat::Fp8, 439)?);
    for (m, n, hidden, with_bias, seed) in [(1, 960, 576, false, 440), (3, 3072, 576, true, 441), (2, 6144, 4096, false, 442)] {
        rows.push(super::check::check_gemv_norm(dev, m, n, hidden, true, false, with_bias, WeightFormat::Fp8, seed)?);
    }
    rows.push(super::check::check_gemv_merge(dev, 4096, 32, 128, 33, 25, WeightFormat::Fp8, 443)?);
    Ok(rows)
}

/// One step of `forward_steps`: its label, the logits of both sides, its rows and tokens.
struct ForwardStep {
    label: &'static str,
    got: Vec<f32>,
    want: Vec<f32>,
    rows: usize,
    tokens: usize,
}

impl ForwardStep {
    /// Rows whose greedy token is the same on both sides.
    fn agreeing(&self, vocab: usize) -> usize {
        (0..self.rows)
            .filter(|&r| crate::sampling::argmax(&self.got[r * vocab..(r + 1) * vocab]) == crate::sampling::argmax(&self.want[r * vocab..(r + 1) * vocab]))
            .count()
    }
}

/// A prefill of every prompt, then a decode step of the first sequence and one of every
/// sequence, on `gpu` and `cpu` in the same order (the decode steps write the same cache slots,
/// the one position after each prompt, so both see the same cache at every step).
fn forward_steps(gpu: &mut GpuBackend, cpu: &mut CpuBackend, prompts: &[Vec<u32>], vocab: usize) -> Result<Vec<ForwardStep>, CudaError> {
    let (block_size, blocks_per_seq) = (16, forward_blocks_per_seq(prompts));
    let num_blocks = blocks_per_seq * prompts.len();
    let table = |i: usize| -> Vec<u32> { ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect() };
    let mut prefill = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate() {
        prefill.push_seq(p, 0, &table(i), true).map_err(config_err)?;
    }
    let got_prefill = gpu.forward_logits(&prefill)?;
    let mut batches = vec![("prefill", prefill)];
    for batch_size in [1, prompts.len()] {
        let mut decode = ForwardBatch::new(block_size, num_blocks);
        for (i, p) in prompts.iter().enumerate().take(batch_size) {
            let next = crate::sampling::argmax(&got_prefill[i * vocab..(i + 1) * vocab]) as u32;
            decode.push_seq(&[next], p.len(), &table(i), true).map_err(config_err)?;
        }
        batches.push((if batch_size == 1 { "decode, 1 sequence" } else { "decode, every sequence" }, decode));
    }
    let mut steps = Vec::new();
    for (label, batch) in &batches {
        let got = if *label == "prefill" { got_prefill.clone() } else { gpu.forward_logits(batch)? };
        let want = cpu.forward(batch).map_err(config_err)?;
        steps.push(ForwardStep { label, got, want, rows: batch.seqs.len(), tokens: batch.num_tokens() });
    }
    Ok(steps)
}

/// Blocks of 16 per sequence for `forward_steps` over `prompts` (the prompt and two more tokens).
fn forward_blocks_per_seq(prompts: &[Vec<u32>]) -> usize {
    (prompts.iter().map(Vec::len).max().unwrap_or(1) + 2).div_ceil(16)
}

/// Blocks enough for `forward_steps` over `prompts` with blocks of 16.
fn forward_blocks(prompts: &[Vec<u32>]) -> usize {
    forward_blocks_per_seq(prompts) * prompts.len()
}

/// The forward of `cpu_model` with its projections quantized to FP8 on the device against the
/// CPU forward of the same FP8 weights (see the module's notes for the tolerances).
pub fn check_forward_fp8(dev: &Arc<GpuDevice>, cpu_model: &CpuModel, prompts: &[Vec<u32>]) -> Result<Vec<CheckRow>, CudaError> {
    if !supported(dev) {
        return Ok(Vec::new());
    }
    let num_blocks = forward_blocks(prompts);
    let rounded = cpu_model.map_matrices(|v| bf16::from_f32(v).to_f32());
    let (fp8_cpu, report) = rounded.with_fp8_projections().map_err(config_err)?;
    let mut cpu = CpuBackend::new(fp8_cpu, num_blocks, 16);
    let mut model = GpuModel::from_cpu(dev.clone(), &rounded)?;
    model.quantize_fp8()?;
    let mut gpu = GpuBackend::new(model, num_blocks, 16)?;
    let vocab = cpu_model.config().vocab_size;
    let mut rows = Vec::new();
    // Whether an earlier step's products quantized their inputs: its keys and values are in the
    // cache every later step reads.
    let mut cache_quantized = false;
    for step in forward_steps(&mut gpu, &mut cpu, prompts, vocab)? {
        let error = relative_error(&step.got, &step.want);
        // The widest projection decides: if the GEMV takes it, it takes every one.
        let c = cpu_model.config();
        let weight_only = gemv_prefers(step.tokens, c.hidden_size, 2 * c.intermediate_size, WeightFormat::Fp8);
        let tolerance = if weight_only && !cache_quantized { FORWARD_TOLERANCE } else { W8A8_FORWARD_TOLERANCE };
        let path = match (weight_only, cache_quantized) {
            (true, false) => "GEMV, bf16 input",
            (true, true) => "GEMV, bf16 input, over keys and values from FP8 inputs",
            (false, _) => "GEMM, FP8 input",
        };
        cache_quantized |= !weight_only;
        rows.push(CheckRow {
            name: "fp8 fwd vs fp8 CPU".into(),
            detail: format!("{} ({path}): top-1 agrees on {}/{}; weights' FP8 error {:.2e}", step.label, step.agreeing(vocab), step.rows, report.relative_rms_error),
            error: Some(error),
            passed: error < tolerance,
        });
    }
    Ok(rows)
}

/// A real GGUF model loaded with its weights kept quantized on the device (`--keep-quantized`)
/// against the CPU forward of the same file (which dequantizes the same blocks to float32): a
/// prefill (bf16 tiles and cuBLAS: `FORWARD_TOLERANCE`) and decode steps (the GEMV from the
/// blocks, its input quantized per 32 values to int8, which the CPU reference does not:
/// `W8A8_FORWARD_TOLERANCE`, as FP8's quantized inputs), the greedy token of every row reported.
/// Seen on SmolLM2-135M's Q4_1 file (H200): 7.1e-3 at prefill, 1.5e-2 to 3.1e-2 at decode, every
/// top-1 token the same. No rows when nothing in the file is of a kept type.
pub fn check_forward_kept(kept: GpuModel, cpu_model: &CpuModel, prompts: &[Vec<u32>]) -> Result<Vec<CheckRow>, CudaError> {
    let formats = kept.bytes_by_format();
    if !formats.iter().any(|(f, _)| matches!(f, WeightFormat::Ggml(_))) {
        return Ok(Vec::new());
    }
    let memory: Vec<String> = formats.iter().map(|(f, bytes)| format!("{f:?} {:.1} MB", *bytes as f64 / 1e6)).collect();
    let num_blocks = forward_blocks(prompts);
    let mut cpu = CpuBackend::new(cpu_model.clone(), num_blocks, 16);
    let mut gpu = GpuBackend::new(kept, num_blocks, 16)?;
    let vocab = cpu_model.config().vocab_size;
    let mut rows = Vec::new();
    for step in forward_steps(&mut gpu, &mut cpu, prompts, vocab)? {
        let error = relative_error(&step.got, &step.want);
        let int8_input = step.tokens <= crate::cuda::launch::GEMV_MAX_ROWS;
        let tolerance = if int8_input { W8A8_FORWARD_TOLERANCE } else { FORWARD_TOLERANCE };
        let path = if int8_input { "GEMV, int8 input" } else { "tiles, bf16 input" };
        rows.push(CheckRow {
            name: "gguf kept fwd vs CPU".into(),
            detail: format!("{} ({path}): top-1 agrees on {}/{}; {}", step.label, step.agreeing(vocab), step.rows, memory.join(", ")),
            error: Some(error),
            passed: error < tolerance,
        });
    }
    Ok(rows)
}
