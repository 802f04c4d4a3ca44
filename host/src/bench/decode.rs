//! Decode throughput at fixed batch sizes: every sequence gets a distinct synthetic prompt of
//! `prompt_len` tokens and generates `gen_len` tokens greedily; prefill time (to every sequence's
//! first token) and decode throughput (the remaining `gen_len - 1` tokens) are reported separately.

use std::time::Instant;

use crate::model::cpu::CpuModel;
use crate::runner::generate::{GenerateOptions, Generator};

#[derive(Debug, Clone, Copy)]
pub struct DecodeResult {
    pub batch: usize,
    pub prefill_seconds: f64,
    pub decode_tokens_per_second: f64,
    pub step_seconds: f64,
}

/// Distinct deterministic prompts (token ids spread over the vocabulary).
pub fn synthetic_prompts(count: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let span = vocab.saturating_sub(100).max(1);
    (0..count).map(|b| (0..len).map(|i| ((b * 7919 + i * 104_729) % span + 100) as u32).collect()).collect()
}

pub fn run(model: &CpuModel, batch: usize, prompt_len: usize, gen_len: usize, repeats: usize) -> anyhow::Result<DecodeResult> {
    anyhow::ensure!(gen_len >= 2, "the generated length must be at least 2");
    let block_size = crate::kv_cache::DEFAULT_BLOCK_SIZE;
    let prompts = synthetic_prompts(batch, prompt_len, model.config().vocab_size);
    let blocks = batch * (prompt_len + gen_len).div_ceil(block_size);
    let (mut prefills, mut rates) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let mut generator = Generator::new(model, blocks, block_size);
        let options = GenerateOptions { max_new_tokens: gen_len, stop_token_ids: Vec::new(), prefill_chunk: None };
        let started = Instant::now();
        let mut first_tokens_at = None;
        let mut tokens = 0usize;
        generator.generate(&prompts, &options, |_, _| {
            tokens += 1;
            if tokens == batch {
                first_tokens_at = Some(Instant::now());
            }
        })?;
        let first = first_tokens_at.expect("every sequence made a token");
        prefills.push((first - started).as_secs_f64());
        rates.push((batch * (gen_len - 1)) as f64 / first.elapsed().as_secs_f64());
    }
    let rate = super::median(&mut rates);
    Ok(DecodeResult {
        batch,
        prefill_seconds: super::median(&mut prefills),
        decode_tokens_per_second: rate,
        step_seconds: batch as f64 / rate,
    })
}
