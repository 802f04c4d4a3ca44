//! The Wasm scheduler as a `SchedulingPolicy`: each engine step's `rank` becomes one plugin call
//! with the compact queue view. A fault (trap, deadline, limit, invalid ranking) is returned as
//! `PolicyError::Failed`, so the mechanism runs that step first-come-first-served; a slot with no
//! active version (removed, or disabled by the circuit breaker with nothing to restore) ranks FCFS
//! natively without calling anything.

use std::sync::Arc;

use super::bindings::types;
use super::slot::{CallFailure, Live, PluginSlot};
use super::PluginError;
use crate::sched::{fcfs_ranking, validate_ranking, Budget, PolicyError, SchedulingPolicy, SeqId, SeqView};

pub struct WasmScheduler {
    slot: Arc<PluginSlot>,
    label: String,
}

impl WasmScheduler {
    pub fn new(slot: Arc<PluginSlot>) -> Self {
        let label = format!("wasm:{}", slot.name());
        WasmScheduler { slot, label }
    }
}

impl SchedulingPolicy for WasmScheduler {
    fn name(&self) -> &str {
        &self.label
    }

    fn rank(&mut self, seqs: &[SeqView<'_>], budget: &Budget) -> Result<Vec<SeqId>, PolicyError> {
        let views: Vec<types::SeqView> = seqs
            .iter()
            .map(|s| types::SeqView {
                id: s.id,
                priority: s.priority,
                tenant: s.tenant.to_string(),
                arrival: s.arrival,
                prompt_tokens: s.prompt_tokens,
                computed_tokens: s.computed_tokens,
                generated_tokens: s.generated_tokens,
                max_tokens: s.max_tokens,
                blocks_held: s.blocks_held,
                running: s.running,
            })
            .collect();
        let budget = types::Budget {
            free_blocks: budget.free_blocks,
            total_blocks: budget.total_blocks,
            block_size: budget.block_size,
            token_budget: budget.token_budget,
            max_seqs: budget.max_seqs,
        };
        let answer = self.slot.call(|live| {
            let Live::Scheduler { store, plugin } = live else { unreachable!("a scheduler slot holds schedulers") };
            match plugin.call_rank(store, &views, budget)? {
                Ok(ranking) => {
                    if ranking.len() != seqs.len() {
                        return Err(CallFailure::Invalid(format!(
                            "ranked {} ids for {} sequences",
                            ranking.len(),
                            seqs.len()
                        )));
                    }
                    validate_ranking(seqs, &ranking).map_err(|e| CallFailure::Invalid(e.to_string()))?;
                    Ok(ranking)
                }
                Err(message) => Err(CallFailure::Invalid(format!("the plugin answered an error: {message}"))),
            }
        });
        match answer {
            Ok(ranking) => Ok(ranking),
            Err(PluginError::Inactive { .. }) => Ok(fcfs_ranking(seqs)),
            Err(fault) => Err(PolicyError::Failed(fault.to_string())),
        }
    }
}
