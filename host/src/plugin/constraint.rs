//! The constraint seam's host side: starting each sequence in the live instance (once per
//! instance: a fresh one after a fault starts them again), one `next` call per step for every
//! sequence of the plugin, ending sequences that are over, and validation of every mask (one per
//! step, not empty, inside the vocabulary) before it reaches a sampler.

use std::collections::HashSet;

use llguidance::toktrie::SimpleVob;

use super::bindings::types;
use super::slot::{CallFailure, Live, PluginSlot};
use super::PluginError;
use crate::sched::SeqId;

/// What a constraint plugin gets once per sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintStart {
    pub prompt_tokens: Vec<u32>,
    /// The request's configuration as JSON text ("" for none).
    pub config: String,
    /// The end-of-sequence token.
    pub eos_token: u32,
}

/// One sequence a constraint plugin answers for in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintStep {
    pub seq: SeqId,
    /// The last tokens (prompt then output), oldest first.
    pub recent_tokens: Vec<u32>,
    pub generated_tokens: u32,
}

/// The plugin's answer for one sequence: the tokens allowed next (`mask_width` wide, the
/// logits row's width), or the plugin's refusal to start it.
pub type StepMask = Result<SimpleVob, String>;

/// Checks a mask and spreads it over `mask_width` ids (`vocab` of them may be allowed; the rest
/// pad the model's embedding).
fn to_vob(mask: types::TokenMask, vocab: u32, mask_width: usize) -> Result<SimpleVob, String> {
    let mut vob = SimpleVob::alloc(mask_width.max(vocab as usize));
    match mask {
        types::TokenMask::All => vob.allow_range(0..=vocab.saturating_sub(1)),
        types::TokenMask::Ranges(ranges) => {
            for (start, end) in ranges {
                if start >= end || end > vocab {
                    return Err(format!("range [{start}, {end}) is empty or outside the vocabulary of {vocab}"));
                }
                vob.allow_range(start..=end - 1);
            }
        }
        types::TokenMask::Bits(words) => {
            if words.len() > (vocab as usize).div_ceil(32) {
                return Err(format!("a bitset of {} words is longer than the vocabulary of {vocab}", words.len()));
            }
            for (index, &word) in words.iter().enumerate() {
                let mut rest = word;
                while rest != 0 {
                    let token = index as u32 * 32 + rest.trailing_zeros();
                    if token >= vocab {
                        return Err(format!("token {token} is outside the vocabulary of {vocab}"));
                    }
                    vob.allow_token(token);
                    rest &= rest - 1;
                }
            }
        }
    }
    if vob.is_zero() {
        return Err("the mask allows no token".into());
    }
    Ok(vob)
}

impl PluginSlot {
    /// One step of constraint plugin `self`: ends the sequences in `ended`, starts those of
    /// `steps` the live instance has not seen (`start` says what each gets), then asks `next`
    /// for all the others. `vocab` ids may be allowed, in masks `mask_width` wide. A fault fails
    /// the whole call; a sequence the plugin refused to start gets its refusal.
    pub fn constraint_step(
        &self,
        ended: &[SeqId],
        steps: &[ConstraintStep],
        start: impl Fn(SeqId) -> ConstraintStart,
        vocab: u32,
        mask_width: usize,
    ) -> Result<Vec<StepMask>, PluginError> {
        self.call(|live| {
            let Live::Constraint { store, plugin, started } = live else { unreachable!("a constraint slot holds constraints") };
            let over: Vec<u64> = ended.iter().copied().filter(|id| started.remove(id)).collect();
            if !over.is_empty() {
                plugin.call_end(&mut *store, &over)?;
            }
            let mut refused: Vec<Option<String>> = vec![None; steps.len()];
            for (i, step) in steps.iter().enumerate() {
                if started.contains(&step.seq) {
                    continue;
                }
                let info = start(step.seq);
                let request = types::ConstraintRequest {
                    id: step.seq,
                    prompt_tokens: info.prompt_tokens,
                    config: info.config,
                    vocab_size: vocab,
                    eos_token: info.eos_token,
                };
                match plugin.call_start(&mut *store, &request)? {
                    Ok(()) => {
                        started.insert(step.seq);
                    }
                    Err(message) => refused[i] = Some(format!("the constraint refused the request: {message}")),
                }
            }
            let asked: Vec<types::ConstraintStep> = steps
                .iter()
                .zip(&refused)
                .filter(|(_, r)| r.is_none())
                .map(|(s, _)| types::ConstraintStep { id: s.seq, recent_tokens: s.recent_tokens.clone(), generated_tokens: s.generated_tokens })
                .collect();
            let mut masks = if asked.is_empty() {
                Vec::new()
            } else {
                match plugin.call_next(&mut *store, &asked)? {
                    Ok(masks) => masks,
                    Err(message) => return Err(CallFailure::Invalid(format!("the plugin answered an error: {message}"))),
                }
            };
            if masks.len() != asked.len() {
                return Err(CallFailure::Invalid(format!("answered {} masks for {} sequences", masks.len(), asked.len())));
            }
            let mut checked = Vec::with_capacity(masks.len());
            for (mask, step) in masks.drain(..).zip(&asked) {
                let vob = to_vob(mask, vocab, mask_width).map_err(|e| CallFailure::Invalid(format!("sequence {}: {e}", step.id)))?;
                checked.push(vob);
            }
            let mut checked = checked.into_iter();
            Ok(refused.into_iter().map(|r| match r { Some(message) => Err(message), None => Ok(checked.next().expect("one mask per asked")) }).collect())
        })
    }
}

/// The sequences a live constraint instance has started.
pub(crate) type Started = HashSet<SeqId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_checked_and_spread_over_the_row() {
        let vob = to_vob(types::TokenMask::Ranges(vec![(1, 3), (7, 8)]), 10, 16).unwrap();
        assert_eq!(vob.to_list(), vec![1, 2, 7]);
        assert_eq!(vob.len(), 16, "as wide as the logits row");
        let vob = to_vob(types::TokenMask::Bits(vec![0b1001]), 10, 16).unwrap();
        assert_eq!(vob.to_list(), vec![0, 3]);
        assert_eq!(to_vob(types::TokenMask::All, 10, 16).unwrap().to_list(), (0..10).collect::<Vec<u32>>(), "padding ids stay out");
        for bad in [
            types::TokenMask::Ranges(vec![]),
            types::TokenMask::Ranges(vec![(3, 3)]),
            types::TokenMask::Ranges(vec![(5, 11)]),
            types::TokenMask::Bits(vec![0]),
            types::TokenMask::Bits(vec![1 << 10]),
            types::TokenMask::Bits(vec![1, 1]),
        ] {
            assert!(to_vob(bad.clone(), 10, 16).is_err(), "{bad:?}");
        }
    }
}
