//! Every supported architecture against HF transformers, on the tiny random-weight checkpoints of
//! `tests/fixtures/arch/` (made, with transformers' outputs, by `scripts/make_arch_fixtures.py`):
//! Llama (Llama 3 RoPE scaling), Mistral (sliding window), Qwen2 (Q/K/V biases), Qwen3 (q/k norms,
//! YaRN), Gemma 3 (sandwich (1 + w) norms, local and global layers with their own RoPE, soft-caps,
//! GELU, scaled embeddings and queries), Phi-3 (fused projections, partial rotary, window) and
//! Qwen3-MoE (top-2 of 8 experts, one dense layer). Prompts are longer than every window.
//!
//! Two checks per architecture and prompt:
//! - log-probs: the CPU forward, teacher-forced along transformers' greedy continuation, gives
//!   every step's top-5 log-probs within `LOGPROB_TOLERANCE`, and the same top token wherever
//!   transformers' top-1/top-2 margin is at least `NEAR_TIE`;
//! - greedy decoding through the paged KV cache (small blocks, so windows span several; whole and
//!   chunked prefill) gives transformers' tokens up to the first near-tie.

use std::path::PathBuf;

use pagedserve::loader::{self, LoadFormat, LoadedModel};
use pagedserve::model::cpu::CpuKvCache;
use pagedserve::runner::generate::{GenerateOptions, Generator};
use pagedserve::runner::ForwardBatch;
use pagedserve::sampling::log_softmax_f64;
use serde_json::Value;

const ARCHITECTURES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3_moe"];
/// transformers (float32, eager attention) and the CPU path (float32, our accumulation order)
/// differ by rounding only; the largest difference seen over all fixtures is printed.
const LOGPROB_TOLERANCE: f64 = 5e-4;
/// Below this top-1/top-2 log-prob margin the two may pick different tokens.
const NEAR_TIE: f64 = 0.02;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch").join(name)
}

fn load(name: &str) -> (LoadedModel, Value) {
    let dir = fixture(name);
    let model = loader::load(&dir, LoadFormat::Auto).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    assert_eq!(
        model.model.config().architecture.to_string(),
        reference["architecture"].as_str().unwrap(),
        "{name}: the loader picked the architecture transformers saved"
    );
    (model, reference)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn every_architecture_matches_transformers_log_probs_along_its_greedy_path() {
    let mut report = Vec::new();
    for name in ARCHITECTURES {
        let (loaded, reference) = load(name);
        let model = &loaded.model;
        let vocab = model.config().vocab_size;
        let mut worst = 0.0f64;
        for (p, prompt) in reference["prompts"].as_array().unwrap().iter().enumerate() {
            let (prompt_ids, greedy) = (ids(&prompt["prompt"]), ids(&prompt["greedy"]));
            let steps = prompt["steps"].as_array().unwrap();
            // One batch: the prompt (logits of its last token), then each greedy token but the
            // last as a one-token chunk of the same sequence (logits of each).
            let total = prompt_ids.len() + greedy.len();
            let (block_size, num_blocks) = (4, total.div_ceil(4));
            let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
            let mut batch = ForwardBatch::new(block_size, num_blocks);
            batch.push_seq(&prompt_ids, 0, &table, true).unwrap();
            for (i, &token) in greedy[..greedy.len() - 1].iter().enumerate() {
                batch.push_seq(&[token], prompt_ids.len() + i, &table, true).unwrap();
            }
            let mut cache = CpuKvCache::new(model.kv_layout(num_blocks, block_size));
            let logits = model.forward(&batch, &mut cache).unwrap();
            for (step, (row, want)) in logits.chunks_exact(vocab).zip(steps).enumerate() {
                let logprobs = log_softmax_f64(row);
                for pair in want["top"].as_array().unwrap() {
                    let (id, lp) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
                    let err = (logprobs[id] - lp).abs();
                    worst = worst.max(err);
                    assert!(err <= LOGPROB_TOLERANCE, "{name} prompt {p} step {step}: token {id} log-prob {} vs {lp}", logprobs[id]);
                }
                let ours = (0..vocab).max_by(|&a, &b| logprobs[a].total_cmp(&logprobs[b])).unwrap();
                if want["margin"].as_f64().unwrap() >= NEAR_TIE {
                    assert_eq!(ours as u64, want["token"].as_u64().unwrap(), "{name} prompt {p} step {step}: top token");
                }
            }
        }
        report.push(format!("{name} {worst:.1e}"));
    }
    println!("largest log-prob difference per architecture: {}", report.join(", "));
}

#[test]
fn every_architecture_decodes_transformers_greedy_tokens_through_the_paged_cache() {
    for name in ARCHITECTURES {
        let (loaded, reference) = load(name);
        for prefill_chunk in [None, Some(5)] {
            for (p, prompt) in reference["prompts"].as_array().unwrap().iter().enumerate() {
                let want = ids(&prompt["greedy"]);
                let margins: Vec<f64> = prompt["steps"].as_array().unwrap().iter().map(|s| s["margin"].as_f64().unwrap()).collect();
                let mut generator = Generator::new(&loaded.model, 32, 4);
                let options = GenerateOptions { max_new_tokens: want.len(), stop_token_ids: Vec::new(), prefill_chunk };
                let got = generator.generate(&[ids(&prompt["prompt"])], &options, |_, _| {}).unwrap().remove(0);
                let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
                let first_tie = margins.iter().position(|&m| m < NEAR_TIE).unwrap_or(want.len());
                assert!(
                    agree >= first_tie.min(want.len()),
                    "{name} prompt {p} (chunk {prefill_chunk:?}): token {agree} differs before the first near-tie at {first_tie}\n got {got:?}\nwant {want:?}"
                );
            }
        }
    }
}

#[test]
fn the_fixture_tokenizer_and_chat_templates_load_with_each_model() {
    for name in ARCHITECTURES {
        let (loaded, reference) = load(name);
        let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer.json");
        let text = reference["text_prompt"].as_str().unwrap();
        let encoded = tokenizer.encode(text, false).unwrap();
        // The last prompt is BOS + the text, as the script tokenized it.
        let last = reference["prompts"].as_array().unwrap().last().unwrap();
        assert_eq!(encoded, ids(&last["prompt"])[1..], "{name}: tokenization");
        let messages = [pagedserve::tokenizer::ChatMessage::new("user", "Hi")];
        let rendered = tokenizer.apply_chat_template(&messages, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(rendered.contains("Hi"), "{name}: {rendered}");
    }
}

#[test]
fn a_sliding_window_model_decodes_past_what_its_blocks_could_hold_without_release() {
    let (loaded, reference) = load("mistral");
    let window = loaded.model.config().all_layers_sliding().expect("every Mistral layer is windowed");
    let prompt = &reference["prompts"][1];
    let (prompt_ids, want) = (ids(&prompt["prompt"]), ids(&prompt["greedy"]));
    let block_size = 4;
    // Enough blocks for the window, a partial block on each side and the chunk being computed,
    // far fewer than the whole sequence needs.
    let num_blocks = window / block_size + 3;
    assert!(num_blocks * block_size < prompt_ids.len() + want.len());
    let mut small = Generator::new(&loaded.model, num_blocks, block_size);
    let options = GenerateOptions { max_new_tokens: want.len(), stop_token_ids: Vec::new(), prefill_chunk: Some(block_size) };
    let got = small.generate(std::slice::from_ref(&prompt_ids), &options, |_, _| {}).unwrap().remove(0);
    let mut large = Generator::new(&loaded.model, 64, block_size);
    assert_eq!(got, large.generate(&[prompt_ids], &options, |_, _| {}).unwrap().remove(0));
    assert_eq!(small.num_free_blocks(), num_blocks, "every block comes back");
}
