//! One forward pass's inputs: the new tokens of every sequence in the batch (prefill chunks and
//! decode tokens alike), their positions, the cache slot each token's key and value go to, and
//! each sequence's block table.
//!
//! Invariants (checked by `push_seq`): a sequence's block table covers every position it writes
//! and reads; its new tokens take positions `start_pos..start_pos + len`, and attention for the
//! token at position `p` reads positions `0..=p` of the same sequence from the cache.
//!
//! Fed tokens (async scheduling): a decode token sampled by the previous launch, whose value the
//! host does not know yet, goes in as `PLACEHOLDER_TOKEN` with a `FedToken` entry saying which
//! of that launch's samples it is; the backend puts the sampled token in its place before the
//! forward reads it (`ModelBackend::launch`).

use std::ops::Range;

use crate::kv_cache::BlockId;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("sequence {seq}: block table of {blocks} blocks cannot hold {tokens} tokens at block size {block_size}")]
    BlockTableTooShort { seq: usize, blocks: usize, tokens: usize, block_size: usize },
    #[error("sequence {seq}: a chunk needs at least one token")]
    EmptyChunk { seq: usize },
    #[error("sequence {seq}: block id {block} is outside the pool of {num_blocks} blocks")]
    BlockOutOfRange { seq: usize, block: BlockId, num_blocks: usize },
    #[error("a fed token names sample {sample}, but the previous launch gave no token there ({samples} samples)")]
    NoFedToken { sample: usize, samples: usize },
}

/// The token id a fed token has in `token_ids` (and in its sequence) until its value is known.
pub const PLACEHOLDER_TOKEN: u32 = u32::MAX;

/// A token of the batch that is the previous launch's sample number `sample` (an index into that
/// launch's `RowSampling`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FedToken {
    /// Index into `token_ids`.
    pub token: usize,
    pub sample: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeqInBatch {
    /// This sequence's tokens in the batch's flat token list.
    pub tokens: Range<usize>,
    /// Tokens of this sequence already in the cache before this pass (its first new position).
    pub start_pos: usize,
    pub block_table: Vec<BlockId>,
}

impl SeqInBatch {
    /// Tokens in the cache after this pass.
    pub fn context_len(&self) -> usize {
        self.start_pos + self.tokens.len()
    }
}

#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub block_size: usize,
    pub num_blocks: usize,
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Cache slot of each token (`block * block_size + offset`).
    pub slot_mapping: Vec<u32>,
    /// Index into `seqs` of each token.
    pub token_seq: Vec<u32>,
    pub seqs: Vec<SeqInBatch>,
    /// Tokens whose logits the caller wants, in order (usually each sequence's last token).
    pub logits_rows: Vec<usize>,
    /// Placeholder tokens to take from the previous launch's samples (see the module header).
    pub fed: Vec<FedToken>,
}

impl ForwardBatch {
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        ForwardBatch {
            block_size,
            num_blocks,
            token_ids: Vec::new(),
            positions: Vec::new(),
            slot_mapping: Vec::new(),
            token_seq: Vec::new(),
            seqs: Vec::new(),
            logits_rows: Vec::new(),
            fed: Vec::new(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Adds a sequence's chunk: `new_tokens` at positions `start_pos..`. If `want_logits`, the
    /// logits of its last token are computed. Returns the sequence's index in the batch.
    pub fn push_seq(
        &mut self,
        new_tokens: &[u32],
        start_pos: usize,
        block_table: &[BlockId],
        want_logits: bool,
    ) -> Result<usize, BatchError> {
        let seq = self.seqs.len();
        if new_tokens.is_empty() {
            return Err(BatchError::EmptyChunk { seq });
        }
        let end = start_pos + new_tokens.len();
        if block_table.len() * self.block_size < end {
            return Err(BatchError::BlockTableTooShort {
                seq,
                blocks: block_table.len(),
                tokens: end,
                block_size: self.block_size,
            });
        }
        if let Some(&block) = block_table.iter().find(|&&b| b as usize >= self.num_blocks) {
            return Err(BatchError::BlockOutOfRange { seq, block, num_blocks: self.num_blocks });
        }
        let first = self.token_ids.len();
        for (i, &token) in new_tokens.iter().enumerate() {
            let pos = start_pos + i;
            let block = block_table[pos / self.block_size] as usize;
            self.token_ids.push(token);
            self.positions.push(pos as u32);
            self.slot_mapping.push((block * self.block_size + pos % self.block_size) as u32);
            self.token_seq.push(seq as u32);
        }
        if want_logits {
            self.logits_rows.push(self.token_ids.len() - 1);
        }
        self.seqs.push(SeqInBatch { tokens: first..self.token_ids.len(), start_pos, block_table: block_table.to_vec() });
        Ok(seq)
    }

    /// Marks the last token pushed, a `PLACEHOLDER_TOKEN`, as the previous launch's sample
    /// number `sample`.
    pub fn feed_last_token(&mut self, sample: usize) {
        let token = self.token_ids.len() - 1;
        debug_assert_eq!(self.token_ids[token], PLACEHOLDER_TOKEN, "only a placeholder is fed");
        self.fed.push(FedToken { token, sample });
    }

    /// Puts the sampled tokens in place of the fed placeholders (`previous`: the previous launch's
    /// sampled token of each of its samples; `None` for a sample that gave no token).
    pub fn resolve_fed(&mut self, previous: &[Option<u32>]) -> Result<(), BatchError> {
        for fed in std::mem::take(&mut self.fed) {
            match previous.get(fed.sample).copied().flatten() {
                Some(token) => self.token_ids[fed.token] = token,
                None => return Err(BatchError::NoFedToken { sample: fed.sample, samples: previous.len() }),
            }
        }
        Ok(())
    }

    /// For each token, whether it is fed (`fed` as a mask over `token_ids`).
    pub fn fed_tokens(&self) -> Vec<bool> {
        let mut fed = vec![false; self.token_ids.len()];
        for f in &self.fed {
            fed[f.token] = true;
        }
        fed
    }

    /// Whether a placeholder is still in the batch (a backend that cannot feed refuses it).
    pub fn has_placeholders(&self) -> bool {
        !self.fed.is_empty() || self.token_ids.contains(&PLACEHOLDER_TOKEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_mapping_follows_block_tables() {
        let mut batch = ForwardBatch::new(4, 16);
        // A prefill chunk of 6 tokens in blocks [7, 2], then a decode token at position 9 in [3, 5, 11].
        batch.push_seq(&[10, 11, 12, 13, 14, 15], 0, &[7, 2], true).unwrap();
        batch.push_seq(&[99], 9, &[3, 5, 11], true).unwrap();
        assert_eq!(batch.positions, vec![0, 1, 2, 3, 4, 5, 9]);
        assert_eq!(batch.slot_mapping, vec![28, 29, 30, 31, 8, 9, 45]);
        assert_eq!(batch.token_seq, vec![0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(batch.logits_rows, vec![5, 6]);
        assert_eq!(batch.seqs[1].context_len(), 10);
    }

    #[test]
    fn rejects_short_block_tables_and_bad_ids() {
        let mut batch = ForwardBatch::new(4, 8);
        assert!(matches!(batch.push_seq(&[1; 5], 0, &[0], false), Err(BatchError::BlockTableTooShort { .. })));
        assert!(matches!(batch.push_seq(&[1], 0, &[8], false), Err(BatchError::BlockOutOfRange { .. })));
        assert!(matches!(batch.push_seq(&[], 0, &[0], false), Err(BatchError::EmptyChunk { .. })));
        assert_eq!(batch.num_tokens(), 0);
    }

    #[test]
    fn fed_placeholders_take_the_previous_samples() {
        let mut batch = ForwardBatch::new(4, 16);
        batch.push_seq(&[5, 6, 7], 0, &[1], true).unwrap();
        batch.push_seq(&[PLACEHOLDER_TOKEN], 6, &[2, 3], true).unwrap();
        batch.feed_last_token(1);
        batch.push_seq(&[PLACEHOLDER_TOKEN], 2, &[4], true).unwrap();
        batch.feed_last_token(0);
        assert!(batch.has_placeholders());
        assert_eq!(batch.resolve_fed(&[Some(40), None]), Err(BatchError::NoFedToken { sample: 1, samples: 2 }));
        let mut batch2 = ForwardBatch::new(4, 16);
        batch2.push_seq(&[PLACEHOLDER_TOKEN], 6, &[2, 3], true).unwrap();
        batch2.feed_last_token(1);
        batch2.push_seq(&[PLACEHOLDER_TOKEN], 2, &[4], true).unwrap();
        batch2.feed_last_token(0);
        assert_eq!(batch2.fed_tokens(), vec![true, true]);
        batch2.resolve_fed(&[Some(40), Some(41)]).unwrap();
        assert_eq!(batch2.token_ids, vec![41, 40]);
        assert!(!batch2.has_placeholders());
    }
}
