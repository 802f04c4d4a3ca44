//! The scheduling policy seam: once per engine step the policy sees a compact view of every
//! sequence (running and waiting) and the step's budget, and answers with one ranking of them.
//! The mechanism (`Scheduler`) fills the step in that order and preempts from the bottom, so the
//! policy decides who is admitted, who keeps running and who yields first, but cannot break an
//! invariant: an answer that is not a permutation of the sequences is a fault, and the step falls
//! back to first-come-first-served.
//!
//! Native policies: `Fcfs` (arrival order) and `Priority` (lower `priority` value first, as vLLM,
//! then arrival). The Wasm scheduler plugins implement the same trait.

pub type SeqId = u64;

/// What a policy sees of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqView<'a> {
    pub id: SeqId,
    /// Lower runs first (vLLM's convention); 0 by default.
    pub priority: i32,
    pub tenant: &'a str,
    /// Arrival order of its request (monotonic, per engine).
    pub arrival: u64,
    pub prompt_tokens: u32,
    pub computed_tokens: u32,
    pub generated_tokens: u32,
    pub max_tokens: u32,
    pub blocks_held: u32,
    pub running: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub block_size: u32,
    pub token_budget: u32,
    pub max_seqs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy answered id {0}, which is not a sequence of this step")]
    UnknownId(SeqId),
    #[error("policy answered id {0} twice")]
    DuplicateId(SeqId),
    #[error("policy left out {0} sequences")]
    Missing(usize),
    /// The policy itself failed (a plugin trapped, ran out of time or memory).
    #[error("policy failed: {0}")]
    Failed(String),
}

impl PolicyError {
    /// A stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::UnknownId(_) | PolicyError::DuplicateId(_) | PolicyError::Missing(_) => "invalid_output",
            PolicyError::Failed(_) => "failed",
        }
    }
}

pub trait SchedulingPolicy: Send {
    fn name(&self) -> &str;

    /// Every sequence's id, best first.
    fn rank(&mut self, seqs: &[SeqView<'_>], budget: &Budget) -> Result<Vec<SeqId>, PolicyError>;
}

/// Checks that `ranking` is a permutation of the ids in `seqs` (sorted ids and a seen-bitmap:
/// a few microseconds for a thousand sequences, paid every step).
pub fn validate_ranking(seqs: &[SeqView<'_>], ranking: &[SeqId]) -> Result<(), PolicyError> {
    let mut known: Vec<SeqId> = seqs.iter().map(|s| s.id).collect();
    known.sort_unstable();
    let mut seen = vec![false; known.len()];
    for &id in ranking {
        let Ok(i) = known.binary_search(&id) else {
            return Err(PolicyError::UnknownId(id));
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(PolicyError::DuplicateId(id));
        }
    }
    let missing = seen.iter().filter(|&&s| !s).count();
    if missing > 0 {
        return Err(PolicyError::Missing(missing));
    }
    Ok(())
}

/// First come, first served: arrival order; among the `n` samples of one request, by id.
#[derive(Debug, Default)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &str {
        "fcfs"
    }

    fn rank(&mut self, seqs: &[SeqView<'_>], _budget: &Budget) -> Result<Vec<SeqId>, PolicyError> {
        Ok(fcfs_ranking(seqs))
    }
}

pub fn fcfs_ranking(seqs: &[SeqView<'_>]) -> Vec<SeqId> {
    let mut order: Vec<(u64, SeqId)> = seqs.iter().map(|s| (s.arrival, s.id)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, id)| id).collect()
}

/// Lower `priority` first, then arrival (vLLM's priority scheduling).
#[derive(Debug, Default)]
pub struct Priority;

impl SchedulingPolicy for Priority {
    fn name(&self) -> &str {
        "priority"
    }

    fn rank(&mut self, seqs: &[SeqView<'_>], _budget: &Budget) -> Result<Vec<SeqId>, PolicyError> {
        let mut order: Vec<(i32, u64, SeqId)> = seqs.iter().map(|s| (s.priority, s.arrival, s.id)).collect();
        order.sort_unstable();
        Ok(order.into_iter().map(|(_, _, id)| id).collect())
    }
}

/// A native policy by name.
pub fn native_policy(name: &str) -> Option<Box<dyn SchedulingPolicy>> {
    match name {
        "fcfs" => Some(Box::new(Fcfs)),
        "priority" => Some(Box::new(Priority)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: SeqId, priority: i32, arrival: u64) -> SeqView<'static> {
        SeqView {
            id,
            priority,
            tenant: "",
            arrival,
            prompt_tokens: 4,
            computed_tokens: 0,
            generated_tokens: 0,
            max_tokens: 8,
            blocks_held: 0,
            running: false,
        }
    }

    const BUDGET: Budget = Budget { free_blocks: 10, total_blocks: 10, block_size: 16, token_budget: 64, max_seqs: 4 };

    #[test]
    fn fcfs_and_priority_orders() {
        let seqs = [view(1, 5, 0), view(2, 0, 1), view(3, 5, 2)];
        assert_eq!(Fcfs.rank(&seqs, &BUDGET).unwrap(), vec![1, 2, 3]);
        assert_eq!(Priority.rank(&seqs, &BUDGET).unwrap(), vec![2, 1, 3]);
    }

    #[test]
    fn rankings_must_be_permutations() {
        let seqs = [view(1, 0, 0), view(2, 0, 1)];
        assert!(validate_ranking(&seqs, &[2, 1]).is_ok());
        assert_eq!(validate_ranking(&seqs, &[1, 9]), Err(PolicyError::UnknownId(9)));
        assert_eq!(validate_ranking(&seqs, &[1, 1]), Err(PolicyError::DuplicateId(1)));
        assert_eq!(validate_ranking(&seqs, &[1]), Err(PolicyError::Missing(1)));
    }
}
