//! The sampler seam's host side: the top-N candidates of a sequence (computed by the host from
//! its logits), one plugin call per step for every sequence that chose a sampler; `answers` checks
//! the answer (one output per input, tokens inside the vocabulary, sane log-probs).

use super::answers;
use super::bindings::types;
use super::slot::{CallFailure, Live, PluginSlot};
use super::PluginError;
use crate::sched::SeqId;

/// One sequence's input to a sampler plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSampleInput {
    pub seq: SeqId,
    /// Candidates best first, and their logits.
    pub token_ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub recent_tokens: Vec<u32>,
    pub generated_tokens: u32,
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PluginSampled {
    pub token: u32,
    pub logprob: Option<f32>,
}

/// The `n` largest logits, best first (ties: lower token id first), as (token ids, logits).
pub fn top_candidates(logits: &[f32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let n = n.min(logits.len());
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_unstable_by(order);
    let values = idx.iter().map(|&i| logits[i as usize]).collect();
    (idx, values)
}

impl PluginSlot {
    /// How many candidates the active sampler wants (instantiating it if needed).
    pub fn sampler_top_n(&self) -> Result<u32, PluginError> {
        self.call_setup(|live| match live {
            Live::Sampler { top_n, .. } => *top_n,
            _ => unreachable!("a sampler slot holds samplers"),
        })
    }

    /// One `sample` call for `inputs`; the answer is checked against `vocab_size`.
    pub fn sample(&self, inputs: &[PluginSampleInput], vocab_size: usize) -> Result<Vec<PluginSampled>, PluginError> {
        let seqs: Vec<types::SampleInput> = inputs
            .iter()
            .map(|i| types::SampleInput {
                id: i.seq,
                token_ids: i.token_ids.clone(),
                logits: i.logits.clone(),
                recent_tokens: i.recent_tokens.clone(),
                generated_tokens: i.generated_tokens,
                temperature: i.temperature,
                seed: i.seed,
            })
            .collect();
        self.call(|live| {
            let Live::Sampler { store, plugin, .. } = live else { unreachable!("a sampler slot holds samplers") };
            let outputs = match plugin.call_sample(store, &seqs)? {
                Ok(outputs) => outputs,
                Err(message) => return Err(CallFailure::Invalid(format!("the plugin answered an error: {message}"))),
            };
            answers::samples(outputs, inputs.len(), vocab_size).map_err(CallFailure::Invalid)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_candidates_best_first_ties_by_id() {
        let (ids, values) = top_candidates(&[0.5, 2.0, -1.0, 2.0, 1.0], 3);
        assert_eq!(ids, vec![1, 3, 4]);
        assert_eq!(values, vec![2.0, 2.0, 1.0]);
        assert_eq!(top_candidates(&[1.0, 3.0], 10).0, vec![1, 0]);
    }
}
