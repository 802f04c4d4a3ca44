//! Shortest job first: the sequence with the least remaining work goes first, where remaining
//! work is the prompt tokens still to compute plus the tokens it may still generate. Ties go by
//! arrival. Short requests overtake long ones; the mean latency drops, the longest ones wait.

use pagedserve_plugin_sdk::scheduler::{export_scheduler, Budget, Guest, SeqView};

/// Tokens still to compute (prefill left) and to generate (at most).
pub fn remaining_work(s: &SeqView) -> u64 {
    let prefill_left = (s.prompt_tokens + s.generated_tokens).saturating_sub(s.computed_tokens) as u64;
    let decode_left = s.max_tokens.saturating_sub(s.generated_tokens) as u64;
    prefill_left + decode_left
}

pub fn rank(seqs: &[SeqView]) -> Vec<u64> {
    let mut order: Vec<(u64, u64, u64)> = seqs.iter().map(|s| (remaining_work(s), s.arrival, s.id)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, _, id)| id).collect()
}

struct ShortestJobFirst;

impl Guest for ShortestJobFirst {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn rank(seqs: Vec<SeqView>, _budget: Budget) -> Result<Vec<u64>, String> {
        Ok(rank(&seqs))
    }
}

export_scheduler!(ShortestJobFirst);

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, arrival: u64, prompt: u32, computed: u32, generated: u32, max_tokens: u32) -> SeqView {
        SeqView {
            prompt_tokens: prompt,
            computed_tokens: computed,
            generated_tokens: generated,
            max_tokens,
            running: computed > 0,
            ..pagedserve_plugin_sdk::scheduler::seq_view(id, arrival)
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
        assert_eq!(rank(&seqs), vec![3, 2, 4, 1]);
        assert_eq!(remaining_work(&seqs[2]), 16);
    }
}
