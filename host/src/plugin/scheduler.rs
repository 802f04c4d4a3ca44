//! The Wasm scheduler as a `SchedulingPolicy`: each engine step's `rank` becomes one plugin call
//! with the queues as a columnar `queue-view` (see `wit/plugins.wit`), and the plugin's answer,
//! indices into that view, becomes the ranking of sequence ids. A fault (trap, deadline, limit,
//! invalid ranking) is returned as `PolicyError::Failed`, so the mechanism runs that step
//! first-come-first-served; a slot with no active version (removed, rolled back to none, or
//! disabled by the circuit breaker with nothing to restore) ranks with the server's native
//! policy (`--scheduling-policy`) without calling anything.
//!
//! The view's columns are kept between calls and refilled in place: a step with a thousand
//! sequences then allocates nothing but the tenant names.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::answers;
use super::bindings::types;
use super::slot::{CallFailure, Live, PluginSlot};
use super::PluginError;
use crate::sched::{Budget, PolicyError, SchedulingPolicy, SeqId, SeqView};

pub struct WasmScheduler {
    slot: Arc<PluginSlot>,
    label: String,
    view: types::QueueView,
    /// The native policy that ranks while the slot has no active version.
    fallback: Box<dyn SchedulingPolicy>,
}

fn empty_view() -> types::QueueView {
    types::QueueView {
        ids: Vec::new(),
        priorities: Vec::new(),
        tenants: Vec::new(),
        tenant_names: Vec::new(),
        arrivals: Vec::new(),
        prompt_tokens: Vec::new(),
        computed_tokens: Vec::new(),
        generated_tokens: Vec::new(),
        max_tokens: Vec::new(),
        blocks_held: Vec::new(),
        running: Vec::new(),
    }
}

/// Fills `view` with `seqs`, column by column, collecting the distinct tenants.
fn fill_view(view: &mut types::QueueView, seqs: &[SeqView<'_>]) {
    let v = view;
    for column in [&mut v.prompt_tokens, &mut v.computed_tokens, &mut v.generated_tokens, &mut v.max_tokens, &mut v.blocks_held, &mut v.tenants] {
        column.clear();
    }
    v.ids.clear();
    v.arrivals.clear();
    v.priorities.clear();
    v.running.clear();
    v.tenant_names.clear();
    // A fast non-cryptographic hash: the keys are tenant names, the map lives for one call.
    let mut index_of: FxHashMap<&str, u32> = FxHashMap::default();
    // The samples of one request share its tenant string: same pointer, no lookup.
    let mut last: (*const u8, u32) = (std::ptr::null(), 0);
    for s in seqs {
        let tenant = if std::ptr::eq(last.0, s.tenant.as_ptr()) {
            last.1
        } else {
            let next = index_of.len() as u32;
            let index = *index_of.entry(s.tenant).or_insert_with(|| {
                v.tenant_names.push(s.tenant.to_string());
                next
            });
            last = (s.tenant.as_ptr(), index);
            index
        };
        v.ids.push(s.id);
        v.priorities.push(s.priority);
        v.tenants.push(tenant);
        v.arrivals.push(s.arrival);
        v.prompt_tokens.push(s.prompt_tokens);
        v.computed_tokens.push(s.computed_tokens);
        v.generated_tokens.push(s.generated_tokens);
        v.max_tokens.push(s.max_tokens);
        v.blocks_held.push(s.blocks_held);
        v.running.push(s.running);
    }
}

impl WasmScheduler {
    pub fn new(slot: Arc<PluginSlot>, fallback: Box<dyn SchedulingPolicy>) -> Self {
        let label = format!("wasm:{}", slot.name());
        WasmScheduler { slot, label, view: empty_view(), fallback }
    }
}

impl SchedulingPolicy for WasmScheduler {
    fn name(&self) -> &str {
        &self.label
    }

    fn rank(&mut self, seqs: &[SeqView<'_>], budget: &Budget) -> Result<Vec<SeqId>, PolicyError> {
        fill_view(&mut self.view, seqs);
        let wit_budget = types::Budget {
            free_blocks: budget.free_blocks,
            total_blocks: budget.total_blocks,
            block_size: budget.block_size,
            token_budget: budget.token_budget,
            max_seqs: budget.max_seqs,
        };
        let view = &self.view;
        let answer = self.slot.call(|live| {
            let Live::Scheduler { store, plugin } = live else { unreachable!("a scheduler slot holds schedulers") };
            match plugin.call_rank(store, view, wit_budget)? {
                Ok(ranking) => answers::ranking(&view.ids, &ranking).map_err(CallFailure::Invalid),
                Err(message) => Err(CallFailure::Invalid(format!("the plugin answered an error: {message}"))),
            }
        });
        match answer {
            Ok(ranking) => Ok(ranking),
            Err(PluginError::Inactive { .. }) => self.fallback.rank(seqs, budget),
            Err(fault) => Err(PolicyError::Failed(fault.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: SeqId, tenant: &str) -> SeqView<'_> {
        SeqView {
            id,
            priority: id as i32,
            tenant,
            arrival: 100 + id,
            prompt_tokens: 1,
            computed_tokens: 2,
            generated_tokens: 3,
            max_tokens: 4,
            blocks_held: 5,
            running: id.is_multiple_of(2),
        }
    }

    #[test]
    fn columns_line_up_and_tenants_are_collected_once() {
        let seqs = [view(7, "a"), view(8, "a"), view(9, ""), view(10, "b"), view(11, "a")];
        let mut v = empty_view();
        fill_view(&mut v, &seqs);
        assert_eq!(v.ids, vec![7, 8, 9, 10, 11]);
        assert_eq!(v.tenant_names, vec!["a", "", "b"]);
        assert_eq!(v.tenants, vec![0, 0, 1, 2, 0]);
        assert_eq!(v.arrivals, vec![107, 108, 109, 110, 111]);
        assert_eq!(v.running, vec![false, true, false, true, false]);
        assert_eq!((v.priorities[3], v.blocks_held[4], v.max_tokens[0]), (10, 5, 4));
        // Refilled in place: nothing of the previous call survives.
        fill_view(&mut v, &seqs[3..4]);
        assert_eq!((v.ids.clone(), v.tenant_names.clone(), v.tenants.clone()), (vec![10], vec!["b".to_string()], vec![0]));
    }

    #[test]
    fn many_tenants_get_consistent_indices() {
        let names: Vec<String> = (0..100).map(|i| format!("t{}", i % 40)).collect();
        let seqs: Vec<SeqView> = names.iter().enumerate().map(|(i, t)| view(i as SeqId, t)).collect();
        let mut v = empty_view();
        fill_view(&mut v, &seqs);
        assert_eq!(v.tenant_names.len(), 40);
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(v.tenant_names[v.tenants[i] as usize], s.tenant);
        }
    }
}
