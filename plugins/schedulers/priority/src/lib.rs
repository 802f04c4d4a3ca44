//! Priority scheduling: lower `priority` first (vLLM's convention), then arrival, then id. A
//! request marked urgent jumps the queue and, when the batch is full, preempts the least urgent.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, Budget, Guest, SeqView};

pub fn rank(seqs: &[SeqView]) -> Vec<u64> {
    let mut order: Vec<(i32, u64, u64)> = seqs.iter().map(|s| (s.priority, s.arrival, s.id)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, _, id)| id).collect()
}

struct Priority;

impl Guest for Priority {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(seqs: Vec<SeqView>, _budget: Budget) -> Result<Vec<u64>, String> {
        Ok(rank(&seqs))
    }
}

export_scheduler!(Priority);

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, priority: i32, arrival: u64) -> SeqView {
        SeqView { priority, running: true, ..pagedserve_plugin_sdk::scheduler::seq_view(id, arrival) }
    }

    #[test]
    fn urgent_first_then_arrival() {
        assert_eq!(rank(&[seq(1, 5, 0), seq(2, 0, 1), seq(3, 5, 2), seq(4, -1, 3)]), vec![4, 2, 1, 3]);
    }
}
