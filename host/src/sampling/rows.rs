//! One step's sampling, as the engine hands it to a backend: which logits row each sample draws
//! from, its sequence's sampler (parameters, penalty state, generator), and whether it wants a
//! token or, for a sampler plugin, its top-N candidates. `sample_rows_host` is the reference
//! implementation on host logits; the CUDA backend does the same on the device
//! (`cuda::sampling`) and copies back only the results.
//!
//! Invariants: results come back in the order of the rows; a `Token` result has already been
//! `observe`d by its sampler (as `SequenceSampler::sample` does), a `Candidates` result has not
//! (the plugin's choice is observed when it comes).

use super::{Sampled, SequenceSampler};
use crate::plugin::top_candidates;

/// What one sample of a step needs.
pub struct RowSampling<'a> {
    /// Index into the batch's `logits_rows`; the `n` samples of a freshly prefilled request all
    /// draw from their prompt's row, so rows may repeat.
    pub row: usize,
    pub sampler: &'a mut SequenceSampler,
    /// `Some(n)`: the request picks its tokens with a sampler plugin, which wants the `n` best
    /// candidates after bias and penalties instead of a token.
    pub candidates: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SampledRow {
    Token(Sampled),
    /// Best first (ties by lower id), with their logits after bias and penalties.
    Candidates { token_ids: Vec<u32>, logits: Vec<f32> },
}

/// Computes every row's pending constraint mask (`SequenceSampler::prepare_constraint`), the rows
/// in parallel; returns the wall time it took (zero when no row had one pending). The GPU backend
/// calls it while the forward runs, so that the masks cost the step nothing when they take less
/// time than the forward.
pub fn prepare_constraints(rows: &mut [RowSampling<'_>]) -> std::time::Duration {
    use rayon::prelude::*;
    let pending = |r: &RowSampling<'_>| r.sampler.constraint().is_some_and(|c| c.is_pending());
    if !rows.iter().any(pending) {
        return std::time::Duration::ZERO;
    }
    let started = std::time::Instant::now();
    rows.par_iter_mut().filter(|r| pending(r)).for_each(|r| r.sampler.prepare_constraint());
    started.elapsed()
}

/// `prepare_constraints`, and each constrained row's mask written into its own `ceil(vocab / 32)`
/// words of `masks` (row `i` at `i * words`; `Constraint::mask_words`' layout) by the thread that
/// computed it, while the mask is in its cache: the device sampler's upload, with no gather
/// after. Unconstrained rows' words are left as they are. Returns the wall time (zero when no
/// row is constrained).
pub fn prepare_constraint_masks(rows: &mut [RowSampling<'_>], vocab: usize, masks: &mut [u32]) -> std::time::Duration {
    use rayon::prelude::*;
    let words = vocab.div_ceil(32);
    assert!(masks.len() >= rows.len() * words, "a mask slot for every row");
    if !rows.iter().any(|r| r.sampler.constraint().is_some()) {
        return std::time::Duration::ZERO;
    }
    let started = std::time::Instant::now();
    rows.par_iter_mut().zip(masks.par_chunks_mut(words)).for_each(|(r, out)| {
        r.sampler.prepare_constraint();
        if let Some(constraint) = r.sampler.constraint() {
            constraint.write_mask_words(vocab, out);
        }
    });
    started.elapsed()
}

/// Samples every row from host logits `[num_rows, vocab]` with the native samplers (each sample
/// works on its own copy of its row, so repeated rows do not see each other's penalties).
pub fn sample_rows_host(logits: &[f32], vocab: usize, rows: &mut [RowSampling<'_>]) -> Vec<SampledRow> {
    let mut scratch = vec![0.0f32; vocab];
    rows.iter_mut()
        .map(|r| {
            scratch.copy_from_slice(&logits[r.row * vocab..(r.row + 1) * vocab]);
            match r.candidates {
                None => SampledRow::Token(r.sampler.sample(&mut scratch)),
                Some(n) => {
                    r.sampler.prepare_constraint();
                    r.sampler.apply_bias_and_penalties(&mut scratch);
                    let (mut token_ids, mut logits) = top_candidates(&scratch, n);
                    // A constraint may allow fewer than `n`: the plugin sees only those.
                    let allowed = logits.iter().take_while(|l| l.is_finite()).count().max(1);
                    token_ids.truncate(allowed);
                    logits.truncate(allowed);
                    SampledRow::Candidates { token_ids, logits }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    #[test]
    fn repeated_rows_sample_independently_and_candidates_skip_observation() {
        let logits = vec![0.0, 3.0, 1.0, /* row 1 */ 5.0, 0.0, 0.0];
        let greedy = SamplingParams { temperature: 0.0, frequency_penalty: 2.0, ..Default::default() };
        let (mut a, mut b, mut c) = (
            SequenceSampler::new(greedy.clone(), &[], 0),
            SequenceSampler::new(greedy.clone(), &[], 1),
            SequenceSampler::new(greedy, &[], 0),
        );
        a.observe(1);
        a.observe(1);
        let mut rows = vec![
            RowSampling { row: 0, sampler: &mut a, candidates: None },
            RowSampling { row: 0, sampler: &mut b, candidates: None },
            RowSampling { row: 1, sampler: &mut c, candidates: Some(2) },
        ];
        let out = sample_rows_host(&logits, 3, &mut rows);
        let token = |r: &SampledRow| match r {
            SampledRow::Token(s) => s.token,
            _ => panic!("expected a token"),
        };
        assert_eq!(token(&out[0]), 2, "3 - 2 * 2 < 1: the penalised sample moves to token 2");
        assert_eq!(token(&out[1]), 1, "its sibling on the same row sees the raw logits");
        assert_eq!(out[2], SampledRow::Candidates { token_ids: vec![0, 1], logits: vec![5.0, 0.0] });
        assert_eq!((a.num_observed(), b.num_observed(), c.num_observed()), (3, 1, 0));
    }
}
