//! FP8 weights (`model::fp8`: E4M3 with a scale per output channel, the layer projections only,
//! as vLLM's `--quantization fp8`) and the FP8 KV cache (`--kv-cache-dtype fp8`: every key and
//! value E4M3 at scale 1) on the default model, against HF transformers' reference outputs and
//! against the same model unquantized: how far the first step's log-probs move, and how long the
//! greedy continuations stay the same. Run with `--nocapture` for the figures; BENCHMARKS.md
//! quotes them.

mod common;

use pagedserve::kv_cache::KvCacheDtype;
use pagedserve::model::cpu::{CpuKvCache, CpuModel};
use pagedserve::runner::generate::{GenerateOptions, Generator};
use pagedserve::runner::{CpuBackend, ForwardBatch};
use pagedserve::sampling::log_softmax_f64;
use serde_json::Value;

use common::{loaded_model, reference};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn first_step_logprobs(model: &CpuModel, prompt: &[u32]) -> Vec<f64> {
    first_step_logprobs_with(model, prompt, KvCacheDtype::Auto)
}

fn first_step_logprobs_with(model: &CpuModel, prompt: &[u32], dtype: KvCacheDtype) -> Vec<f64> {
    let mut cache = CpuKvCache::with_dtype(model.kv_layout(8, 16), dtype);
    let mut batch = ForwardBatch::new(16, 8);
    batch.push_seq(prompt, 0, &(0..8).collect::<Vec<_>>(), true).unwrap();
    log_softmax_f64(&model.forward(&batch, &mut cache).unwrap())
}

fn greedy(model: &CpuModel, prompt: &[u32], tokens: usize) -> Vec<u32> {
    greedy_with(model, prompt, tokens, KvCacheDtype::Auto)
}

fn greedy_with(model: &CpuModel, prompt: &[u32], tokens: usize, dtype: KvCacheDtype) -> Vec<u32> {
    let options = GenerateOptions { max_new_tokens: tokens, stop_token_ids: Vec::new(), prefill_chunk: None };
    let mut generator = Generator::with_backend(CpuBackend::with_kv_cache(model.clone(), 64, 16, dtype));
    generator.generate(&[prompt.to_vec()], &options, |_, _| {}).unwrap().remove(0)
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b])).unwrap()
}

/// How a variant of the default model (quantized weights, or a quantized cache) agrees with HF's
/// reference and with the model as it is, over the reference prompts.
#[derive(Debug, Default)]
struct Agreement {
    prompts: usize,
    /// The largest move of the reference's top-1 log-prob, of any of its top 10, and the largest
    /// KL(as it is || variant) over the whole vocabulary, at the first step.
    worst_top1_shift: f64,
    worst_top10_shift: f64,
    worst_kl: f64,
    /// Prompts whose first-step top-1 is still the reference's.
    top1_kept: usize,
    /// Greedy tokens equal to the unquantized model's before the first difference, of all.
    same_tokens: usize,
    all_tokens: usize,
}

/// Runs `variant_logprobs` (the first step's log-probs) and `variant_greedy` (a greedy
/// continuation of that many tokens) on every reference prompt, printing a row per prompt.
fn agreement(model: &CpuModel, label: &str, variant_logprobs: impl Fn(&[u32]) -> Vec<f64>, variant_greedy: impl Fn(&[u32], usize) -> Vec<u32>) -> Agreement {
    let prompts = reference()["greedy"]["prompts"].as_array().unwrap();
    let mut a = Agreement { prompts: prompts.len(), ..Default::default() };
    println!("{label}:");
    println!("{:<40} {:>11} {:>11} {:>9} {:>8} {:>12}", "prompt", "top-1 dlogp", "top-10 max", "KL", "top-1", "same greedy");
    for prompt in prompts {
        let prompt_ids = ids(&prompt["prompt_ids"]);
        let first = &prompt["first_position"];
        let want_ids = ids(&first["top10_ids"]);
        let want: Vec<f64> = first["top10_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = variant_logprobs(&prompt_ids);
        // How far the reference's top-10 log-probs moved (the tail ones move most), the top-1's,
        // and KL(unquantized || variant) over the whole vocabulary.
        let shift = want_ids.iter().zip(&want).map(|(&id, w)| (got[id as usize] - w).abs()).fold(0.0, f64::max);
        let top1_shift = (got[want_ids[0] as usize] - want[0]).abs();
        let unquantized = first_step_logprobs(model, &prompt_ids);
        let kl: f64 = unquantized.iter().zip(&got).map(|(p, q)| p.exp() * (p - q)).sum();
        a.worst_top10_shift = a.worst_top10_shift.max(shift);
        a.worst_top1_shift = a.worst_top1_shift.max(top1_shift);
        a.worst_kl = a.worst_kl.max(kl);
        let top1 = argmax(&got) as u32 == want_ids[0];
        a.top1_kept += usize::from(top1);
        // Greedy tokens against the unquantized model, as long as the reference continuation.
        let expected = ids(&prompt["new_ids"]);
        let base = greedy(model, &prompt_ids, expected.len());
        let quantized = variant_greedy(&prompt_ids, expected.len());
        let same = base.iter().zip(&quantized).take_while(|(a, b)| a == b).count();
        a.same_tokens += same;
        a.all_tokens += base.len();
        let text: String = prompt["prompt_text"].as_str().unwrap_or("").replace('\n', " ").chars().take(38).collect();
        println!("{text:<40} {top1_shift:>11.4} {shift:>11.4} {kl:>9.5} {:>8} {:>6} of {:<4}", if top1 { "same" } else { "changed" }, same, base.len());
    }
    println!(
        "{label} over {} prompts: worst top-1 log-prob shift {:.4}, worst top-10 shift {:.4}, worst KL {:.5}; first-step top-1 kept in {}; greedy tokens equal to the unquantized model's before the first difference: {} of {}",
        a.prompts, a.worst_top1_shift, a.worst_top10_shift, a.worst_kl, a.top1_kept, a.same_tokens, a.all_tokens
    );
    a
}

impl Agreement {
    /// Asserts the first-step shifts and KL under these bounds, the reference's top-1 kept on at
    /// least 80% of the prompts and at least half the greedy tokens equal to the model's as it is.
    fn assert_within(&self, top1_shift: f64, top10_shift: f64, kl: f64) {
        assert!(self.worst_top1_shift < top1_shift, "{self:?}");
        assert!(self.worst_top10_shift < top10_shift, "{self:?}");
        assert!(self.worst_kl < kl, "{self:?}");
        assert!(self.top1_kept * 10 >= self.prompts * 8, "{self:?}");
        assert!(self.same_tokens * 2 >= self.all_tokens, "{self:?}");
    }
}

// FP8 weights: about 1.5 times the worst measured on the four reference prompts (session 9:
// 0.268, 1.152 and 0.0436; BENCHMARKS.md): a broken quantizer (a wrong scale, a lost sign) lands
// far outside.
const TOP1_SHIFT_BOUND: f64 = 0.4;
const TOP10_SHIFT_BOUND: f64 = 1.75;
const KL_BOUND: f64 = 0.07;

#[test]
fn fp8_projections_stay_close_to_the_reference() {
    let model = &loaded_model().model;
    let (fp8, report) = model.with_fp8_projections().unwrap();
    let layers = model.config().num_hidden_layers;
    println!("fp8: {} matrices, {} weights, relative RMS error {:.4}", report.matrices, report.weights, report.relative_rms_error);
    assert_eq!(report.matrices, 4 * layers, "qkv, o_proj, gate_up and down of every layer, nothing else");
    // Three mantissa bits: about 2^-5 of RMS error on weights spread over the range.
    assert!(report.relative_rms_error > 0.005 && report.relative_rms_error < 0.05, "{report:?}");

    let a = agreement(model, "fp8 weights", |p| first_step_logprobs(&fp8, p), |p, n| greedy(&fp8, p, n));
    // Bounds with room over what was measured (BENCHMARKS.md, session 9): a broken quantizer
    // (a wrong scale, a lost sign, an unquantized matrix reported as quantized) fails them.
    a.assert_within(TOP1_SHIFT_BOUND, TOP10_SHIFT_BOUND, KL_BOUND);
}

// FP8 KV cache: about 1.5 times the worst measured on the four reference prompts (session 20:
// 0.104, 0.531 and 0.0101; BENCHMARKS.md). Scale 1 leaves SmolLM2's keys and values far from
// E4M3's ±448 (its keys reach about 20 and its values 13 on these prompts), so nothing
// saturates; a cache that lost a sign or a scale would land far outside.
const KV_TOP1_SHIFT_BOUND: f64 = 0.16;
const KV_TOP10_SHIFT_BOUND: f64 = 0.8;
const KV_KL_BOUND: f64 = 0.015;

#[test]
fn an_fp8_kv_cache_stays_close_to_the_reference() {
    let model = &loaded_model().model;
    let fp8 = KvCacheDtype::Fp8E4M3;
    let a = agreement(model, "fp8 KV cache", |p| first_step_logprobs_with(model, p, fp8), |p, n| greedy_with(model, p, n, fp8));
    // The cache really is quantized: the first step already reads the prompt's keys and values
    // back from it, so its log-probs move.
    assert!(a.worst_kl > 1e-6, "{a:?}");
    a.assert_within(KV_TOP1_SHIFT_BOUND, KV_TOP10_SHIFT_BOUND, KV_KL_BOUND);
}

/// An FP8 checkpoint in vLLM's format, made from the tiny Llama fixture (each projection's
/// E4M3 values and a `[rows, 1]` `weight_scale`, the rest as it was), loads as exactly the values
/// `with_fp8_projections` computes with: the same logits, bit for bit.
#[test]
fn fp8_checkpoints_load_as_the_values_they_hold() {
    use pagedserve::loader::{self, LoadFormat};
    use pagedserve::model::fp8::Fp8Matrix;
    use safetensors::tensor::{Dtype, TensorView};
    use safetensors::SafeTensors;

    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/llama");
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let projection = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut quantized = 0;
    for (name, view) in tensors.tensors() {
        let is_projection = name.ends_with(".weight") && projection.iter().any(|p| name.contains(p));
        if !is_projection {
            owned.push((name, view.dtype(), view.shape().to_vec(), view.data().to_vec()));
            continue;
        }
        let values: Vec<f32> = match view.dtype() {
            Dtype::BF16 => view.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => panic!("{name}: {other:?}"),
        };
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        let q = Fp8Matrix::quantize(&values, rows, cols).unwrap();
        owned.push((format!("{name}_scale"), Dtype::F32, vec![rows, 1], q.scales.iter().flat_map(|s| s.to_le_bytes()).collect()));
        owned.push((name, Dtype::F8_E4M3, vec![rows, cols], q.bytes));
        quantized += 1;
    }
    assert_eq!(quantized, 7 * 2, "seven projections in each of the two layers");
    let views: Vec<(String, TensorView<'_>)> =
        owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = serde_json::json!({"quant_method": "fp8", "activation_scheme": "dynamic"});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }

    let original = loader::load(&fixture, LoadFormat::Auto).unwrap().model;
    let (expected, _) = original.with_fp8_projections().unwrap();
    let checkpoint = loader::load(dir.path(), LoadFormat::Auto).unwrap().model;
    let prompt: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 2000).collect();
    let (want, got) = (first_step_logprobs(&expected, &prompt), first_step_logprobs(&checkpoint, &prompt));
    assert_eq!(got, want, "the checkpoint's weights are the quantized values, read back");
    let unquantized = first_step_logprobs(&original, &prompt);
    assert_ne!(got, unquantized, "and not the original ones");
}

