//! Shortest job first: the sequence with the least remaining work goes first, where remaining
//! work is the prompt tokens still to compute plus the tokens it may still generate. Ties go by
//! arrival. Short requests overtake long ones; the mean latency drops, the longest ones wait.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, rank_by, Budget, Guest, QueueView, Seq};

/// Tokens still to compute (prefill left) and to generate (at most).
pub fn remaining_work(s: &Seq<'_>) -> u64 {
    let prefill_left = (s.prompt_tokens + s.generated_tokens).saturating_sub(s.computed_tokens) as u64;
    let decode_left = s.max_tokens.saturating_sub(s.generated_tokens) as u64;
    prefill_left + decode_left
}

pub fn rank(queue: &QueueView) -> Vec<u32> {
    rank_by(queue, |s| (remaining_work(&s), s.arrival, s.id))
}

struct ShortestJobFirst;

impl Guest for ShortestJobFirst {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        Ok(rank(&queue))
    }
}

export_scheduler!(ShortestJobFirst);

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, arrival: u64, prompt: u32, computed: u32, generated: u32, max_tokens: u32) -> Seq<'static> {
        Seq {
            prompt_tokens: prompt,
            computed_tokens: computed,
            generated_tokens: generated,
            max_tokens,
            running: computed > 0,
            ..pagedserve_plugin_sdk::scheduler::seq(id, arrival)
        }
    }

    #[test]
    fn least_remaining_work_first() {
        let seqs = [
            seq(1, 0, 100, 0, 0, 100),  // 200 left
            seq(2, 1, 10, 0, 0, 10),    // 20 left
            seq(3, 2, 10, 14, 4, 20),   // 16 left
            seq(4, 3, 10, 0, 0, 10),    // 20 left, later than 2
        ];
        let queue = QueueView::from_seqs(&seqs);
        assert_eq!(queue.ids_of(&rank(&queue)), vec![3, 2, 4, 1]);
        assert_eq!(remaining_work(&seqs[2]), 16);
    }
}
