//! The tensor-parallel CPU backend against `CpuBackend` on the llama fixture, split 2 and 4 ways
//! (4: its two key/value heads each replicated on two ranks): the same greedy generation through
//! the offline `Generator`, the same host sampling, the engine's block accounting over the shared
//! blocks, and copy-on-write copying a block on every rank.

use std::path::PathBuf;

use super::CpuTensorParallelBackend;
use crate::kv_cache::KvCacheDtype;
use crate::loader::{open, LoadFormat, ModelFiles};
use crate::model::cpu::{CpuModel, CpuTensorParallelModel};
use crate::runner::generate::{GenerateOptions, Generator};
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, SampledRow, SamplingParams, SequenceSampler};

const WORLDS: [usize; 2] = [2, 4];
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 32;

fn fixture() -> ModelFiles {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/llama");
    open(&dir, LoadFormat::Safetensors).unwrap()
}

fn whole_backend(files: &ModelFiles) -> CpuBackend {
    CpuBackend::new(CpuModel::load(files.config.clone(), files.source(), None).unwrap(), NUM_BLOCKS, BLOCK_SIZE)
}

fn split_backend(files: &ModelFiles, world: usize) -> CpuTensorParallelBackend {
    let model = CpuTensorParallelModel::load(files.config.clone(), files.source(), world).unwrap();
    CpuTensorParallelBackend::new(model, NUM_BLOCKS, BLOCK_SIZE, KvCacheDtype::Auto)
}

/// Three prompts of 5, 9 and 13 tokens, with ids spread over every rank's vocabulary range.
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [5u32, 9, 13]
        .iter()
        .enumerate()
        .map(|(seq, &len)| (0..len).map(|i| (i * 97 + seq as u32 * 31 + 13) % vocab as u32).collect())
        .collect()
}

fn greedy_tokens<B: ModelBackend>(backend: B, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    // Chunks of 4 prompt tokens: prefill and decode share steps, over several block tables.
    let options = GenerateOptions { max_new_tokens: 8, stop_token_ids: Vec::new(), prefill_chunk: Some(4) };
    Generator::with_backend(backend).generate(prompts, &options, |_, _| {}).unwrap()
}

#[test]
fn greedy_generation_matches_the_whole_model() {
    let files = fixture();
    let prompts = prompts(files.config.vocab_size);
    let want = greedy_tokens(whole_backend(&files), &prompts);
    for world in WORLDS {
        assert_eq!(greedy_tokens(split_backend(&files, world), &prompts), want, "world {world}");
    }
}

#[test]
fn kv_layout_is_the_whole_models_over_the_shared_blocks() {
    let files = fixture();
    let whole = *whole_backend(&files).kv_layout();
    for world in WORLDS {
        let backend = split_backend(&files, world);
        assert_eq!(*backend.kv_layout(), whole, "world {world}");
        for cache in &backend.caches {
            assert_eq!((cache.layout().num_blocks, cache.layout().block_size), (NUM_BLOCKS, BLOCK_SIZE));
        }
    }
}

#[test]
fn block_bytes_count_replicated_kv_heads_on_every_rank() {
    let files = fixture();
    let whole = whole_backend(&files).kv_layout().block_bytes(4);
    let kv_heads = files.config.num_key_value_heads;
    for world in WORLDS {
        let model = CpuTensorParallelModel::load(files.config.clone(), files.source(), world).unwrap();
        let copies_of_each_head = world.div_ceil(kv_heads);
        assert_eq!(CpuTensorParallelBackend::block_bytes(&model, BLOCK_SIZE, KvCacheDtype::Auto), whole * copies_of_each_head, "world {world}");
    }
}

/// A prompt of 6 tokens in blocks [0, 1], then one decode token at position 6 in `table`.
fn decode_after_prompt(backend: &mut dyn ModelBackend, table: &[u32]) -> Vec<f32> {
    let mut prefill = ForwardBatch::new(BLOCK_SIZE, NUM_BLOCKS);
    prefill.push_seq(&[11, 12, 13, 14, 15, 16], 0, &[0, 1], false).unwrap();
    backend.forward(&prefill).unwrap();
    let mut decode = ForwardBatch::new(BLOCK_SIZE, NUM_BLOCKS);
    decode.push_seq(&[17], 6, table, true).unwrap();
    backend.forward(&decode).unwrap()
}

#[test]
fn copy_on_write_copies_the_block_on_every_rank() {
    let files = fixture();
    for world in WORLDS {
        let mut original = split_backend(&files, world);
        let want = decode_after_prompt(&mut original, &[0, 1]);

        let mut copied = split_backend(&files, world);
        let mut prefill = ForwardBatch::new(BLOCK_SIZE, NUM_BLOCKS);
        prefill.push_seq(&[11, 12, 13, 14, 15, 16], 0, &[0, 1], false).unwrap();
        copied.forward(&prefill).unwrap();
        copied.copy_blocks(&[(0, 5), (1, 6)]);
        for (rank, cache) in copied.caches.iter().enumerate() {
            let block = |b: usize| {
                let len = cache.layout().layer_len() / NUM_BLOCKS;
                let (keys, values) = cache.layer(0);
                (keys.to_vec()[b * len..(b + 1) * len].to_vec(), values.to_vec()[b * len..(b + 1) * len].to_vec())
            };
            assert_eq!(block(5), block(0), "world {world} rank {rank}: block 0 copied to 5");
            assert!(block(5).0.iter().any(|&v| v != 0.0), "world {world} rank {rank}: the prompt's keys are there");
        }
        let mut decode = ForwardBatch::new(BLOCK_SIZE, NUM_BLOCKS);
        decode.push_seq(&[17], 6, &[5, 6], true).unwrap();
        assert_eq!(copied.forward(&decode).unwrap(), want, "world {world}: decoding from the copies");
    }
}

#[test]
fn forward_sampled_samples_the_whole_vocabulary_on_the_host() {
    let files = fixture();
    let greedy = SamplingParams { temperature: 0.0, logprobs: Some(3), ..Default::default() };
    let sample = |backend: &mut dyn ModelBackend| -> Vec<SampledRow> {
        let mut batch = ForwardBatch::new(BLOCK_SIZE, NUM_BLOCKS);
        batch.push_seq(&[3, 1, 4, 1, 5], 0, &[0, 1], true).unwrap();
        batch.push_seq(&[9, 2, 6], 0, &[2], true).unwrap();
        let (mut a, mut b) = (SequenceSampler::new(greedy.clone(), &[], 0), SequenceSampler::new(greedy.clone(), &[], 0));
        let mut rows = [RowSampling { row: 0, sampler: &mut a, candidates: None }, RowSampling { row: 1, sampler: &mut b, candidates: Some(4) }];
        backend.forward_sampled(&batch, &mut rows).unwrap()
    };
    let want = sample(&mut whole_backend(&files));
    for world in WORLDS {
        let got = sample(&mut split_backend(&files, world));
        match (&want[0], &got[0]) {
            (SampledRow::Token(w), SampledRow::Token(g)) => {
                assert_eq!(w.token, g.token, "world {world}");
                assert!((w.logprob - g.logprob).abs() < 1e-4, "world {world}: log-prob {} against {}", g.logprob, w.logprob);
                assert_eq!(w.top.len(), g.top.len());
            }
            other => panic!("tokens expected, got {other:?}"),
        }
        match (&want[1], &got[1]) {
            (SampledRow::Candidates { token_ids: w, .. }, SampledRow::Candidates { token_ids: g, .. }) => assert_eq!(w, g, "world {world}"),
            other => panic!("candidates expected, got {other:?}"),
        }
    }
}
