//! A backend that runs no model: every row gets a pseudo-random token at once (`bench serve
//! --host-only`). Everything else the engine does per step runs for real, with the model's real
//! tokenizer: scheduling, KV-cache bookkeeping, the sampling hand-off, detokenizing, stop checks
//! and the events to each request. So a run times the engine's own host cost per step, the part
//! a GPU waits out between two forwards.

use crate::kv_cache::{BlockId, KvCacheLayout};
use crate::model::{ModelConfig, ModelError};
use crate::runner::{ForwardBatch, ModelBackend};
use crate::sampling::{RowSampling, Sampled, SampledRow};

pub struct HostOnlyBackend {
    config: ModelConfig,
    layout: KvCacheLayout,
    /// xorshift64 state: the same seed draws the same tokens.
    state: u64,
}

/// Token ids below this are not drawn: vocabularies keep their special tokens there.
const FIRST_DRAWN_ID: u32 = 100;

impl HostOnlyBackend {
    pub fn new(config: ModelConfig, num_blocks: usize, block_size: usize, seed: u64) -> Self {
        let layout = KvCacheLayout::for_model(&config, num_blocks, block_size);
        HostOnlyBackend { config, layout, state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }

    /// A token in `FIRST_DRAWN_ID..vocab` that is none of the model's end-of-sequence ids, so that
    /// every request runs to its `max_tokens`, as with dummy weights.
    fn draw(&mut self) -> u32 {
        let span = (self.config.vocab_size as u32).saturating_sub(FIRST_DRAWN_ID).max(1);
        loop {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let token = FIRST_DRAWN_ID + (self.state % span as u64) as u32;
            if !self.config.eos_token_ids.contains(&token) {
                return token;
            }
        }
    }
}

impl ModelBackend for HostOnlyBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> &KvCacheLayout {
        &self.layout
    }

    fn copy_blocks(&mut self, _copies: &[(BlockId, BlockId)]) {}

    fn forward(&mut self, _batch: &ForwardBatch) -> Result<Vec<f32>, ModelError> {
        Err(ModelError::Input("the host-only backend computes no logits; it samples tokens only".into()))
    }

    fn forward_sampled(&mut self, _batch: &ForwardBatch, rows: &mut [RowSampling<'_>]) -> Result<Vec<SampledRow>, ModelError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            if row.candidates.is_some() {
                return Err(ModelError::Input("the host-only backend does not serve sampler plugins".into()));
            }
            let token = self.draw();
            row.sampler.observe(token);
            out.push(SampledRow::Token(Sampled { token, logprob: 0.0, top: Vec::new() }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_avoid_special_and_end_ids_and_repeat_with_the_seed() {
        let mut config = ModelConfig::dense(crate::model::Arch::Llama, 64, 128, 2, 4, 2, 16, 110).unwrap();
        config.eos_token_ids = vec![105];
        let draws = |seed| {
            let mut b = HostOnlyBackend::new(config.clone(), 4, 16, seed);
            (0..2000).map(|_| b.draw()).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert!(a.iter().all(|&t| (100..110).contains(&t) && t != 105));
        assert_eq!((100..110).filter(|t| *t != 105 && a.contains(t)).count(), 9, "every other id drawn");
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
    }
}
