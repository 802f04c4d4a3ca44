//! Priority scheduling: lower `priority` first (vLLM's convention), then arrival, then id. A
//! request marked urgent jumps the queue and, when the batch is full, preempts the least urgent.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, rank_by, Budget, Guest, QueueView};

pub fn rank(queue: &QueueView) -> Vec<u32> {
    rank_by(queue, |s| (s.priority, s.arrival, s.id))
}

struct Priority;

impl Guest for Priority {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        Ok(rank(&queue))
    }
}

export_scheduler!(Priority);

#[cfg(test)]
mod tests {
    use super::*;
    use pagedserve_plugin_sdk::scheduler::Seq;

    fn seq(id: u64, priority: i32, arrival: u64) -> Seq<'static> {
        Seq { priority, running: true, ..pagedserve_plugin_sdk::scheduler::seq(id, arrival) }
    }

    #[test]
    fn urgent_first_then_arrival() {
        let queue = QueueView::from_seqs(&[seq(1, 5, 0), seq(2, 0, 1), seq(3, 5, 2), seq(4, -1, 3)]);
        assert_eq!(queue.ids_of(&rank(&queue)), vec![4, 2, 1, 3]);
    }
}
