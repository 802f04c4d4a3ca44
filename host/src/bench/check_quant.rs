//! `pagedserve check`'s rows for weights kept quantized on the device.
//!
//! GGUF Q4_K (`--keep-q4k`): the dequantizing GEMV (one row, each input staging) and the tiled
//! path (dequantized bf16 tiles and cuBLAS, more rows) against the CPU product with the CPU's
//! dequantization of the same blocks (`model::gguf`), within `TOLERANCE`.
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
//!   the rows whose greedy token agrees reported.

use std::sync::Arc;

use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::check::{device_weight, download_bf16, matmul_reference, random_bf16_values, relative_error, to_bf16, CheckRow, FORWARD_TOLERANCE};
use crate::cuda::fp8_gemm::{fp8_linear, Fp8Product};
use crate::cuda::gemm::{q4k_linear, OutType};
use crate::cuda::gemv::{gemv, Gemv, GemvInput};
use crate::cuda::launch::{gemv_prefers, WeightFormat};
use crate::cuda::weights::MatrixData;
use crate::cuda::{ptr, CudaError, GpuBackend, GpuDevice, GpuModel};
use crate::model::cpu::CpuModel;
use crate::model::fp8::Fp8Matrix;
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};

/// The logits of a forward whose products quantize their inputs to FP8 against a CPU forward
/// that does not (seen: 4e-2 at most on the 2-layer fixture, H200).
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

/// The Q4_K product of `m` rows: the GEMV at one row, dequantized tiles of `tile_rows` rows and
/// cuBLAS at more.
pub fn check_q4k_product(dev: &GpuDevice, m: usize, n: usize, k: usize, tile_rows: usize, seed: u64) -> Result<CheckRow, CudaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = random_bf16_values(&mut rng, m * k, 1.0);
    let (w_dev, w_values) = device_weight(dev, &[seed as f32], n, k, WeightFormat::Q4K)?;
    let want = matmul_reference(&x, &w_values, None, m, k, n);
    let stream = &dev.stream;
    let x_dev = stream.clone_htod(&to_bf16(&x))?;
    let out = stream.clone_htod(&vec![bf16::NAN; m * n])?;
    let blocks = w_dev.weight(dev);
    let path = if m == 1 {
        let g = Gemv { out: ptr(dev, &out), out_type: OutType::Bf16, input: GemvInput::Plain(ptr(dev, &x_dev)), w: blocks, bias: 0, m, k, n };
        // SAFETY: every buffer is allocated above at the size `Gemv` documents.
        unsafe { gemv(dev, &g)? };
        "gemv".to_string()
    } else {
        let tile = stream.alloc_zeros::<bf16>(tile_rows * k)?;
        let crate::cuda::gemv::GemvWeight::Q4K(blocks) = blocks else { unreachable!("a Q4_K weight") };
        // SAFETY: as above; the tile holds `tile_rows` rows of `k`.
        unsafe { q4k_linear(dev, ptr(dev, &out), OutType::Bf16, ptr(dev, &x_dev), blocks, (ptr(dev, &tile), tile_rows * k), m, k, n)? };
        format!("tiles of {tile_rows} rows")
    };
    let got = download_bf16(dev, &out, m * n)?;
    Ok(CheckRow::error("q4k linear", format!("m {m} n {n} k {k}, {path}"), relative_error(&got, &want)))
}

/// Every Q4_K row: the GEMV at SmolLM2-like and 8B widths, the fused stagings, the tiled path with
/// a partial last tile.
pub fn q4k_checks(dev: &GpuDevice) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    for (n, k, seed) in [(960, 512, 500), (1001, 1024, 501), (6144, 4096, 502), (4096, 14336, 503), (28672, 4096, 504)] {
        rows.push(check_q4k_product(dev, 1, n, k, 0, seed)?);
    }
    for (m, n, k, tile_rows, seed) in [(2, 960, 512, 960, 510), (9, 1001, 1024, 300, 511), (64, 6144, 4096, 4096, 512)] {
        rows.push(check_q4k_product(dev, m, n, k, tile_rows, seed)?);
    }
    rows.push(super::check::check_gemv_silu(dev, 1, 576, 1536, WeightFormat::Q4K, 520)?);
    rows.push(super::check::check_gemv_silu(dev, 1, 4096, 14336, WeightFormat::Q4K, 521)?);
    for (n, hidden, with_bias, indirect, seed) in [(960, 512, false, false, 530), (3072, 4096, true, false, 531), (4000, 4096, false, true, 532)] {
        rows.push(super::check::check_gemv_norm(dev, 1, n, hidden, true, indirect, with_bias, WeightFormat::Q4K, seed)?);
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
    Ok(rows)
}

/// The forward with FP8 projections quantized on the device against the CPU forward of the same
/// FP8 weights (both from the bf16-rounded model): prefill of every prompt, then decode at one
/// row (the FP8 GEMV) and at every prompt's row (the GEMV or the GEMM, as the weights' size
/// decides); logits, and how many rows' greedy tokens agree.
pub fn check_forward_fp8(
    dev: &Arc<GpuDevice>,
    cpu_model: &CpuModel,
    prompts: &[Vec<u32>],
) -> Result<Vec<CheckRow>, CudaError> {
    if !supported(dev) {
        return Ok(Vec::new());
    }
    let block_size = 16;
    let blocks_per_seq = (prompts.iter().map(Vec::len).max().unwrap_or(1) + 2).div_ceil(block_size);
    let num_blocks = blocks_per_seq * prompts.len();
    let rounded = cpu_model.map_matrices(|v| bf16::from_f32(v).to_f32());
    let (fp8_cpu, report) = rounded.with_fp8_projections().map_err(config_err)?;
    let mut cpu = CpuBackend::new(fp8_cpu, num_blocks, block_size);
    let mut model = GpuModel::from_cpu(dev.clone(), &rounded)?;
    model.quantize_fp8()?;
    let mut gpu = GpuBackend::new(model, num_blocks, block_size)?;
    let table = |i: usize| -> Vec<u32> { ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect() };
    let vocab = cpu_model.config().vocab_size;
    let mut prefill = ForwardBatch::new(block_size, num_blocks);
    for (i, p) in prompts.iter().enumerate() {
        prefill
            .push_seq(p, 0, &table(i), true)
            .map_err(config_err)?;
    }
    let mut steps = vec![("prefill", prefill)];
    let got_prefill = gpu.forward_logits(&steps[0].1)?;
    for batch_size in [1, prompts.len()] {
        let mut decode = ForwardBatch::new(block_size, num_blocks);
        for (i, p) in prompts.iter().enumerate().take(batch_size) {
            let next = crate::sampling::argmax(&got_prefill[i * vocab..(i + 1) * vocab]) as u32;
            decode
                .push_seq(&[next], p.len(), &table(i), true)
                .map_err(config_err)?;
        }
        steps.push((
            if batch_size == 1 {
                "decode, 1 sequence"
            } else {
                "decode, every sequence"
            },
            decode,
        ));
    }
    let mut rows = Vec::new();
    for (label, batch) in &steps {
        // The decode steps write the same cache slots (the one position after each prompt), so
        // the CPU, run in the same order, sees the same cache as the GPU at every step.
        let got = if *label == "prefill" { got_prefill.clone() } else { gpu.forward_logits(batch)? };
        let want = cpu.forward(batch).map_err(config_err)?;
        let error = relative_error(&got, &want);
        let batch_rows = batch.seqs.len();
        let agree = (0..batch_rows)
            .filter(|&r| {
                crate::sampling::argmax(&got[r * vocab..(r + 1) * vocab])
                    == crate::sampling::argmax(&want[r * vocab..(r + 1) * vocab])
            })
            .count();
        // The widest projection decides: if the GEMV takes it, it takes every one.
        let c = cpu_model.config();
        let weight_only = gemv_prefers(batch.num_tokens(), c.hidden_size, 2 * c.intermediate_size, WeightFormat::Fp8);
        let tolerance = if weight_only { FORWARD_TOLERANCE } else { W8A8_FORWARD_TOLERANCE };
        rows.push(CheckRow {
            name: "fp8 fwd vs fp8 CPU".into(),
            detail: format!(
                "{label} ({}): top-1 agrees on {agree}/{batch_rows}; weights' FP8 error {:.2e}",
                if weight_only {
                    "GEMV, bf16 input"
                } else {
                    "GEMM, FP8 input"
                },
                report.relative_rms_error
            ),
            error: Some(error),
            passed: error < tolerance,
        });
    }
    Ok(rows)
}
