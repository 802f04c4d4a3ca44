//! First come, first served: arrival order, then id (the samples of one request share an arrival).
//! The same order as the host's native `fcfs`, as a plugin: the baseline for plugin overhead.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, rank_by, Budget, Guest, QueueView};

pub fn rank(queue: &QueueView) -> Vec<u32> {
    rank_by(queue, |s| (s.arrival, s.id))
}

struct Fcfs;

impl Guest for Fcfs {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        Ok(rank(&queue))
    }
}

export_scheduler!(Fcfs);

#[cfg(test)]
mod tests {
    use super::*;
    use pagedserve_plugin_sdk::scheduler::seq;

    #[test]
    fn arrival_order_then_id() {
        let queue = QueueView::from_seqs(&[seq(3, 2), seq(1, 0), seq(5, 0), seq(2, 1)]);
        assert_eq!(queue.ids_of(&rank(&queue)), vec![1, 5, 2, 3]);
    }
}
