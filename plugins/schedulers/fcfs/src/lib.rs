//! First come, first served: arrival order, then id (the samples of one request share an arrival).
//! The same order as the host's native `fcfs`, as a plugin: the baseline for plugin overhead.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, Budget, Guest, SeqView};

pub fn rank(seqs: &[SeqView]) -> Vec<u64> {
    let mut order: Vec<(u64, u64)> = seqs.iter().map(|s| (s.arrival, s.id)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, id)| id).collect()
}

struct Fcfs;

impl Guest for Fcfs {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(seqs: Vec<SeqView>, _budget: Budget) -> Result<Vec<u64>, String> {
        Ok(rank(&seqs))
    }
}

export_scheduler!(Fcfs);

#[cfg(test)]
mod tests {
    use super::*;

    pub fn seq(id: u64, arrival: u64) -> SeqView {
        pagedserve_plugin_sdk::scheduler::seq_view(id, arrival)
    }

    #[test]
    fn arrival_order_then_id() {
        assert_eq!(rank(&[seq(3, 2), seq(1, 0), seq(5, 0), seq(2, 1)]), vec![1, 5, 2, 3]);
    }
}
