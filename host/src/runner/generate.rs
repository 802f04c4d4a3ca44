//! Offline generation: drives a set of sequences through the model together, step by step, with
//! greedy decoding. Each step builds one `ForwardBatch` in which prompts are prefilled (in chunks
//! of at most `prefill_chunk` tokens, if set) and generated tokens are decoded, side by side.
//!
//! This is what the `generate` and `bench` commands and the model tests use; the serving engine
//! has its own scheduler but the same batch contract.

use crate::kv_cache::{KvCacheManager, SeqBlocks};
use crate::model::cpu::CpuModel;
use crate::model::ModelError;
use crate::runner::{CpuBackend, ForwardBatch, ModelBackend};
use crate::sampling::argmax;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Batch(#[from] super::BatchError),
    #[error("the KV cache ({num_blocks} blocks of {block_size} tokens) cannot hold this batch")]
    OutOfBlocks { num_blocks: usize, block_size: usize },
    #[error("prompt {0} is empty")]
    EmptyPrompt(usize),
}

struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    num_computed: usize,
    blocks: SeqBlocks,
    finished: bool,
}

pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop a sequence after it emits one of these.
    pub stop_token_ids: Vec<u32>,
    /// Prefill at most this many prompt tokens of a sequence per step.
    pub prefill_chunk: Option<usize>,
}

pub struct Generator<B: ModelBackend> {
    backend: B,
    kv: KvCacheManager,
}

impl Generator<CpuBackend> {
    /// A generator on the CPU backend with a cache of `num_blocks` blocks.
    pub fn new(model: &CpuModel, num_blocks: usize, block_size: usize) -> Self {
        Self::with_backend(CpuBackend::new(model.clone(), num_blocks, block_size))
    }
}

impl<B: ModelBackend> Generator<B> {
    pub fn with_backend(backend: B) -> Self {
        let layout = *backend.kv_layout();
        let window = backend.config().all_layers_sliding();
        Generator { backend, kv: KvCacheManager::new(layout.num_blocks, layout.block_size, false).with_sliding_window(window) }
    }

    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    /// Runs all `prompts` to completion; `on_token(seq, token)` sees each token as it is made.
    /// Returns the generated tokens of each prompt (prompt excluded).
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>, GenerateError> {
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(GenerateError::EmptyPrompt(i));
        }
        let mut seqs: Vec<Sequence> = prompts
            .iter()
            .map(|p| Sequence {
                tokens: p.clone(),
                prompt_len: p.len(),
                num_computed: 0,
                blocks: SeqBlocks::default(),
                finished: options.max_new_tokens == 0,
            })
            .collect();
        let result = self.run(&mut seqs, options, &mut on_token);
        for seq in &mut seqs {
            self.kv.free(&mut seq.blocks);
        }
        result?;
        Ok(seqs.into_iter().map(|s| s.tokens[s.prompt_len..].to_vec()).collect())
    }

    fn run(
        &mut self,
        seqs: &mut [Sequence],
        options: &GenerateOptions,
        on_token: &mut impl FnMut(usize, u32),
    ) -> Result<(), GenerateError> {
        loop {
            let mut batch = ForwardBatch::new(self.kv.block_size(), self.kv.num_blocks());
            let mut sampled = Vec::new();
            for (i, seq) in seqs.iter_mut().enumerate().filter(|(_, s)| !s.finished) {
                let remaining = seq.tokens.len() - seq.num_computed;
                let take = options.prefill_chunk.map_or(remaining, |chunk| remaining.min(chunk.max(1)));
                let end = seq.num_computed + take;
                // Sequences here are never forked, so no copy-on-write copies arise.
                if !self.kv.allocate(&mut seq.blocks, seq.num_computed, end, &mut Vec::new()) {
                    return Err(GenerateError::OutOfBlocks {
                        num_blocks: self.kv.num_blocks(),
                        block_size: self.kv.block_size(),
                    });
                }
                let want_logits = end == seq.tokens.len();
                batch.push_seq(&seq.tokens[seq.num_computed..end], seq.num_computed, seq.blocks.table(), want_logits)?;
                seq.num_computed = end;
                if want_logits {
                    sampled.push(i);
                }
            }
            if batch.num_tokens() == 0 {
                return Ok(());
            }
            let logits = self.backend.forward(&batch)?;
            // The pass has read what it needed: blocks outside every window can go.
            for seq in seqs.iter_mut() {
                self.kv.commit(&mut seq.blocks, &seq.tokens, seq.num_computed);
            }
            let vocab = self.backend.config().vocab_size;
            for (row, &i) in sampled.iter().enumerate() {
                let token = argmax(&logits[row * vocab..(row + 1) * vocab]) as u32;
                let seq = &mut seqs[i];
                seq.tokens.push(token);
                on_token(i, token);
                let generated = seq.tokens.len() - seq.prompt_len;
                if generated >= options.max_new_tokens || options.stop_token_ids.contains(&token) {
                    seq.finished = true;
                }
            }
        }
    }
}
