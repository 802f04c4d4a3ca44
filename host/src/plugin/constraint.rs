//! The constraint seam's host side: starting each sequence in the live instance (once per
//! instance: a fresh one after a fault starts them again), one `next` call per step for every
//! sequence of the plugin, ending sequences that are over, and every mask checked by `answers` (one per
//! step, not empty, inside the vocabulary) before it reaches a sampler.

use std::collections::HashSet;

use llguidance::toktrie::SimpleVob;

use super::answers;
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
                let vob = answers::token_mask(mask, vocab, mask_width).map_err(|e| CallFailure::Invalid(format!("sequence {}: {e}", step.id)))?;
                checked.push(vob);
            }
            let mut checked = checked.into_iter();
            Ok(refused.into_iter().map(|r| match r { Some(message) => Err(message), None => Ok(checked.next().expect("one mask per asked")) }).collect())
        })
    }
}

/// The sequences a live constraint instance has started.
pub(crate) type Started = HashSet<SeqId>;
