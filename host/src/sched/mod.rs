//! The scheduling mechanism: every engine step it asks the policy for a ranking of all sequences,
//! then walks it, giving each sequence the tokens it needs next (a prefill chunk or one decode
//! token) under the step's token budget and sequence limit, and the KV blocks to hold them.
//! When blocks run out, the lowest-ranked running sequences are preempted (recompute: their
//! blocks are freed and they start over later, with identical output).
//!
//! vLLM V1's rule drives it: a sequence has `num_computed` tokens catching up with its token
//! count; prefill, chunked prefill, decode and resumption after preemption are all that one rule.
//!
//! At light load the prompts are paced (`SchedulerConfig::light_load_step_tokens`, Sarathi-Serve's
//! stall-free batching): decodes always run, and prompt chunks fill only what is left of a step of
//! that many tokens, so a burst of prompts starts over several steps instead of stalling every
//! decode behind one long prefill.

mod policy;

use std::collections::HashMap;

pub use self::policy::{
    fcfs_ranking, native_policy, validate_ranking, Budget, Fcfs, PolicyError, Priority, SchedulingPolicy, SeqId,
    SeqView,
};
use crate::kv_cache::{BlockId, KvCacheManager, SeqBlocks};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences holding KV blocks at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (prefill chunks plus decode tokens).
    pub max_num_batched_tokens: usize,
    /// Prompt pacing at light load; 0 turns it off. While every sequence (running and waiting)
    /// would fit in a step of this many tokens, a step holds at most this many: each running
    /// decode its one token, prompt chunks the rest. The first tokens come much sooner (no stream
    /// waits behind a burst's whole prefill) and equal requests that arrive together stop
    /// moving in lockstep (all prefilled in one step, all finishing in one step, all arriving
    /// again together). The price: more steps carry prompt chunks, and those run kernel by
    /// kernel, not as a captured graph. One prompt with nothing else in the system is never
    /// paced: nobody would wait for it.
    pub light_load_step_tokens: usize,
}

impl SchedulerConfig {
    /// No prompt pacing (`light_load_step_tokens` 0).
    pub fn new(max_num_seqs: usize, max_num_batched_tokens: usize) -> Self {
        SchedulerConfig { max_num_seqs, max_num_batched_tokens, light_load_step_tokens: 0 }
    }
}

/// One sequence as the scheduler keeps it.
#[derive(Debug)]
pub struct SchedSeq {
    pub id: SeqId,
    pub priority: i32,
    pub tenant: String,
    pub arrival: u64,
    /// Prompt, then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub max_tokens: usize,
    pub blocks: SeqBlocks,
    pub running: bool,
    pub num_preemptions: u32,
}

impl SchedSeq {
    pub fn new(id: SeqId, tokens: Vec<u32>, max_tokens: usize, priority: i32, tenant: String, arrival: u64) -> Self {
        SchedSeq {
            id,
            priority,
            tenant,
            arrival,
            prompt_len: tokens.len(),
            tokens,
            num_computed: 0,
            max_tokens,
            blocks: SeqBlocks::default(),
            running: false,
            num_preemptions: 0,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// First position computed in this step.
    pub start: usize,
    pub num_new: usize,
    /// This step reaches the sequence's last token, so its logits are sampled.
    pub samples: bool,
}

#[derive(Debug, Default)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
    /// Copy-on-write block copies the backend must make before the forward pass.
    pub copies: Vec<(BlockId, BlockId)>,
    pub num_tokens: usize,
    /// Set when the policy's answer was rejected and FCFS was used instead.
    pub policy_fault: Option<PolicyError>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    policy: Box<dyn SchedulingPolicy>,
    seqs: HashMap<SeqId, SchedSeq>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, policy: Box<dyn SchedulingPolicy>) -> Self {
        Scheduler { config, policy, seqs: HashMap::new() }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// Replaces the policy between steps; returns the previous one.
    pub fn set_policy(&mut self, policy: Box<dyn SchedulingPolicy>) -> Box<dyn SchedulingPolicy> {
        std::mem::replace(&mut self.policy, policy)
    }

    pub fn add(&mut self, seq: SchedSeq) {
        let previous = self.seqs.insert(seq.id, seq);
        assert!(previous.is_none(), "sequence id reused");
    }

    pub fn get(&self, id: SeqId) -> Option<&SchedSeq> {
        self.seqs.get(&id)
    }

    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut SchedSeq> {
        self.seqs.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn seqs(&self) -> impl Iterator<Item = &SchedSeq> {
        self.seqs.values()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.seqs.values().filter(|s| s.running).count()
    }

    pub fn num_waiting(&self) -> usize {
        self.seqs.len() - self.num_running()
    }

    /// Takes a sequence out (finished or aborted) and gives its blocks back.
    pub fn remove(&mut self, id: SeqId, kv: &mut KvCacheManager) -> Option<SchedSeq> {
        let mut seq = self.seqs.remove(&id)?;
        kv.free(&mut seq.blocks);
        Some(seq)
    }

    /// A running copy of `parent` under `id` that shares its blocks (the `n` samples of a request).
    pub fn fork(&mut self, parent: SeqId, id: SeqId, kv: &mut KvCacheManager) {
        let p = &self.seqs[&parent];
        let child = SchedSeq {
            id,
            priority: p.priority,
            tenant: p.tenant.clone(),
            arrival: p.arrival,
            tokens: p.tokens.clone(),
            prompt_len: p.prompt_len,
            num_computed: p.num_computed,
            max_tokens: p.max_tokens,
            blocks: kv.fork(&p.blocks),
            running: p.running,
            num_preemptions: 0,
        };
        self.add(child);
    }

    fn views(seqs: &HashMap<SeqId, SchedSeq>) -> Vec<SeqView<'_>> {
        seqs.values()
            .map(|s| SeqView {
                id: s.id,
                priority: s.priority,
                tenant: &s.tenant,
                arrival: s.arrival,
                prompt_tokens: s.prompt_len as u32,
                computed_tokens: s.num_computed as u32,
                generated_tokens: s.num_generated() as u32,
                max_tokens: s.max_tokens as u32,
                blocks_held: s.blocks.num_held() as u32,
                running: s.running,
            })
            .collect()
    }

    /// Decides this step's batch.
    pub fn schedule(&mut self, kv: &mut KvCacheManager) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        if self.seqs.is_empty() {
            return out;
        }
        let budget = Budget {
            free_blocks: kv.num_free_blocks() as u32,
            total_blocks: kv.num_blocks() as u32,
            block_size: kv.block_size() as u32,
            token_budget: self.config.max_num_batched_tokens as u32,
            max_seqs: self.config.max_num_seqs as u32,
        };
        let ranking = {
            let views = Self::views(&self.seqs);
            match self.policy.rank(&views, &budget).and_then(|r| validate_ranking(&views, &r).map(|()| r)) {
                Ok(ranking) => ranking,
                Err(fault) => {
                    out.policy_fault = Some(fault);
                    fcfs_ranking(&views)
                }
            }
        };

        let mut token_budget = self.config.max_num_batched_tokens;
        // Prompt tokens (anything but a running sequence's one decode token) this step may take.
        let mut prompt_budget = self.prompt_budget();
        let mut slots = self.config.max_num_seqs;
        // Sequences at `tail` and beyond are out of this step (preempted, or not admissible).
        let mut tail = ranking.len();
        let mut pos = 0;
        while pos < tail {
            let id = ranking[pos];
            pos += 1;
            let seq = self.seqs.get_mut(&id).expect("validated ranking");
            if slots == 0 {
                if seq.running {
                    Self::preempt(seq, kv);
                    out.preempted.push(id);
                }
                continue;
            }
            if !seq.running && (token_budget == 0 || prompt_budget == 0) {
                continue;
            }
            if !seq.running && seq.blocks.num_blocks() == 0 {
                seq.num_computed = kv.match_prefix(&mut seq.blocks, &seq.tokens);
            }
            let needed = seq.tokens.len() - seq.num_computed;
            let is_decode = seq.running && needed == 1;
            let num_new = if is_decode { needed.min(token_budget) } else { needed.min(token_budget).min(prompt_budget) };
            let admitted = num_new == 0
                || loop {
                    let seq = self.seqs.get_mut(&id).unwrap();
                    let total = seq.num_computed + num_new;
                    if kv.allocate(&mut seq.blocks, seq.num_computed, total, &mut out.copies) {
                        break true;
                    }
                    // Out of blocks: the lowest-ranked running sequence below this one yields.
                    let victim = (pos..tail).rev().find(|&i| self.seqs[&ranking[i]].running);
                    match victim {
                        Some(i) => {
                            let victim_seq = self.seqs.get_mut(&ranking[i]).unwrap();
                            Self::preempt(victim_seq, kv);
                            out.preempted.push(ranking[i]);
                            tail = i;
                        }
                        None => break false,
                    }
                };
            let seq = self.seqs.get_mut(&id).unwrap();
            if !admitted {
                if seq.running {
                    Self::preempt(seq, kv);
                    out.preempted.push(id);
                } else {
                    // Give back the prefix-cache hits it took; it stays waiting.
                    kv.free(&mut seq.blocks);
                    seq.num_computed = 0;
                }
                continue;
            }
            if num_new == 0 {
                // Running, but no token budget left this step: it keeps its slot and blocks.
                slots -= 1;
                continue;
            }
            seq.running = true;
            slots -= 1;
            token_budget -= num_new;
            if !is_decode {
                prompt_budget -= num_new;
            }
            out.num_tokens += num_new;
            out.scheduled.push(ScheduledSeq {
                id,
                start: seq.num_computed,
                num_new,
                samples: seq.num_computed + num_new == seq.tokens.len(),
            });
        }
        out
    }

    /// How many prompt tokens this step may take: the whole token budget, or at light load what
    /// a step of `light_load_step_tokens` leaves after the running decodes.
    fn prompt_budget(&self) -> usize {
        let full = self.config.max_num_batched_tokens;
        let target = self.config.light_load_step_tokens;
        // Off; or heavy load; or one sequence alone, which nobody waits for.
        if target == 0 || target >= full || self.seqs.len() > target || self.seqs.len() == 1 {
            return full;
        }
        let decodes = self.seqs.values().filter(|s| s.running && s.tokens.len() - s.num_computed == 1).count();
        // `seqs.len() <= target`: at least one token is left for each sequence that is not decoding.
        target - decodes
    }

    fn preempt(seq: &mut SchedSeq, kv: &mut KvCacheManager) {
        kv.free(&mut seq.blocks);
        seq.num_computed = 0;
        seq.running = false;
        seq.num_preemptions += 1;
    }

    /// Records that the scheduled tokens were computed (their keys and values are cached):
    /// `advance`, then `commit`.
    pub fn step_done(&mut self, output: &SchedulerOutput, kv: &mut KvCacheManager) {
        self.advance(output);
        self.commit(output, kv);
    }

    /// Counts the scheduled tokens as computed, so that the next step starts after them. With
    /// async scheduling this happens while the step still runs; `commit` waits for its success.
    pub fn advance(&mut self, output: &SchedulerOutput) {
        for s in &output.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.num_computed = s.start + s.num_new;
            }
        }
    }

    /// Hands the scheduled sequences' computed blocks to the KV-cache manager (prefix-cache
    /// hashes of the full ones, blocks a sliding window has left behind): only once the step
    /// that computed them succeeded.
    pub fn commit(&mut self, output: &SchedulerOutput, kv: &mut KvCacheManager) {
        for s in &output.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                kv.commit(&mut seq.blocks, &seq.tokens, seq.num_computed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_num_seqs: usize, max_num_batched_tokens: usize) -> SchedulerConfig {
        SchedulerConfig::new(max_num_seqs, max_num_batched_tokens)
    }

    fn seq(id: SeqId, prompt_len: usize, priority: i32) -> SchedSeq {
        SchedSeq::new(id, (0..prompt_len as u32).map(|t| t + id as u32 * 1000).collect(), 100, priority, String::new(), id)
    }

    /// Runs a step as the engine would: every sampling sequence appends a token.
    fn step(s: &mut Scheduler, kv: &mut KvCacheManager) -> SchedulerOutput {
        let out = s.schedule(kv);
        s.step_done(&out, kv);
        for sch in &out.scheduled {
            if sch.samples {
                s.get_mut(sch.id).unwrap().tokens.push(7);
            }
        }
        kv.check_invariants();
        out
    }

    #[test]
    fn chunked_prefill_under_the_token_budget_then_decode() {
        let mut kv = KvCacheManager::new(32, 4, false);
        let mut s = Scheduler::new(config(8, 8), Box::new(Fcfs));
        s.add(seq(1, 10, 0));
        s.add(seq(2, 3, 0));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![ScheduledSeq { id: 1, start: 0, num_new: 8, samples: false }]);
        let out = step(&mut s, &mut kv);
        assert_eq!(
            out.scheduled,
            vec![
                ScheduledSeq { id: 1, start: 8, num_new: 2, samples: true },
                ScheduledSeq { id: 2, start: 0, num_new: 3, samples: true },
            ]
        );
        let out = step(&mut s, &mut kv);
        assert_eq!(out.num_tokens, 2, "two decode tokens");
    }

    fn paced(max_num_batched_tokens: usize, light_load_step_tokens: usize) -> SchedulerConfig {
        SchedulerConfig { light_load_step_tokens, ..config(64, max_num_batched_tokens) }
    }

    fn tokens_of(out: &SchedulerOutput, id: SeqId) -> usize {
        out.scheduled.iter().find(|x| x.id == id).map_or(0, |x| x.num_new)
    }

    #[test]
    fn a_burst_of_prompts_at_light_load_starts_over_several_steps() {
        let mut kv = KvCacheManager::new(64, 4, false);
        let mut s = Scheduler::new(paced(256, 20), Box::new(Fcfs));
        for id in 1..=4 {
            s.add(seq(id, 16, 0));
        }
        // Without pacing all four prompts (64 tokens) would go in the first step.
        let out = step(&mut s, &mut kv);
        assert_eq!((out.num_tokens, tokens_of(&out, 1), tokens_of(&out, 2)), (20, 16, 4));
        // Seq 1 decodes; the prompts share what a step of 20 leaves.
        let out = step(&mut s, &mut kv);
        assert_eq!((out.num_tokens, tokens_of(&out, 1), tokens_of(&out, 2), tokens_of(&out, 3)), (20, 1, 12, 7));
        let out = step(&mut s, &mut kv);
        assert_eq!((tokens_of(&out, 1), tokens_of(&out, 2), tokens_of(&out, 3), tokens_of(&out, 4)), (1, 1, 9, 9));
        assert_eq!(out.num_tokens, 20);
        let out = step(&mut s, &mut kv);
        assert_eq!((out.num_tokens, tokens_of(&out, 4)), (10, 7), "three decodes and the last prompt's rest");
    }

    #[test]
    fn a_prompt_longer_than_a_paced_step_goes_in_chunks_first_in_line() {
        let mut kv = KvCacheManager::new(64, 4, false);
        let mut s = Scheduler::new(paced(256, 20), Box::new(Fcfs));
        s.add(seq(1, 50, 0));
        s.add(seq(2, 4, 0));
        let out = step(&mut s, &mut kv);
        assert_eq!((tokens_of(&out, 1), tokens_of(&out, 2)), (20, 0), "the short one does not cut in");
        let out = step(&mut s, &mut kv);
        assert_eq!((tokens_of(&out, 1), tokens_of(&out, 2)), (20, 0));
        let out = step(&mut s, &mut kv);
        assert_eq!((tokens_of(&out, 1), tokens_of(&out, 2)), (10, 4), "the rest of the long one, then the short one whole");
    }

    #[test]
    fn pacing_never_holds_a_decode_back() {
        let mut kv = KvCacheManager::new(128, 4, false);
        // A more urgent long prompt ranks above three running decodes, yet they all run every
        // step and the prompt takes only what a step of 20 leaves.
        let mut s = Scheduler::new(paced(256, 20), Box::new(Priority));
        for id in 1..=3 {
            s.add(seq(id, 4, 5));
        }
        step(&mut s, &mut kv);
        s.add(seq(9, 100, 0));
        for _ in 0..3 {
            let out = step(&mut s, &mut kv);
            assert_eq!((1..=3).map(|id| tokens_of(&out, id)).collect::<Vec<_>>(), vec![1, 1, 1]);
            assert_eq!((tokens_of(&out, 9), out.num_tokens), (17, 20));
        }
    }

    #[test]
    fn pacing_leaves_a_lone_prompt_and_heavy_load_to_the_whole_budget() {
        let mut kv = KvCacheManager::new(256, 4, false);
        let mut s = Scheduler::new(paced(64, 20), Box::new(Fcfs));
        s.add(seq(1, 100, 0));
        assert_eq!(step(&mut s, &mut kv).num_tokens, 64, "alone: nobody waits for it");
        assert_eq!(step(&mut s, &mut kv).num_tokens, 36, "its second chunk too");
        s.remove(1, &mut kv);
        // More sequences than a paced step holds: the step takes the whole budget, as unpaced.
        for id in 1..=21 {
            s.add(seq(id, 3, 0));
        }
        assert_eq!(step(&mut s, &mut kv).num_tokens, 63);
        assert_eq!(step(&mut s, &mut kv).num_tokens, 21);
    }

    #[test]
    fn out_of_blocks_preempts_the_lowest_ranked_and_it_resumes_later() {
        // 4 blocks of 4 tokens; two sequences of 7 tokens each need 2 blocks, then a third.
        let mut kv = KvCacheManager::new(4, 4, false);
        let mut s = Scheduler::new(config(8, 64), Box::new(Fcfs));
        s.add(seq(1, 7, 0));
        s.add(seq(2, 7, 0));
        step(&mut s, &mut kv); // both prefilled, 8 tokens each now
        let out = step(&mut s, &mut kv); // decode at position 7: still fits
        assert!(out.preempted.is_empty());
        // Position 8 needs a third block each: only seq 1 can have it, seq 2 (newer) yields.
        let out = step(&mut s, &mut kv);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(out.scheduled.len(), 1);
        assert!(!s.get(2).unwrap().running && s.get(2).unwrap().num_computed == 0);
        // Once seq 1 finishes, seq 2 recomputes everything it had.
        s.remove(1, &mut kv);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![ScheduledSeq { id: 2, start: 0, num_new: 9, samples: true }]);
        s.remove(2, &mut kv);
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn priority_policy_preempts_for_a_more_urgent_arrival_when_slots_are_full() {
        let mut kv = KvCacheManager::new(64, 4, false);
        let mut s = Scheduler::new(config(2, 64), Box::new(Priority));
        s.add(seq(1, 4, 5));
        s.add(seq(2, 4, 5));
        step(&mut s, &mut kv);
        s.add(seq(3, 4, 0)); // more urgent, arrives last
        let out = step(&mut s, &mut kv);
        assert_eq!(out.preempted, vec![2]);
        let ids: Vec<SeqId> = out.scheduled.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![3, 1]);
    }

    struct Garbage;
    impl SchedulingPolicy for Garbage {
        fn name(&self) -> &str {
            "garbage"
        }
        fn rank(&mut self, _: &[SeqView<'_>], _: &Budget) -> Result<Vec<SeqId>, PolicyError> {
            Ok(vec![42, 42])
        }
    }

    #[test]
    fn an_invalid_ranking_falls_back_to_fcfs() {
        let mut kv = KvCacheManager::new(8, 4, false);
        let mut s = Scheduler::new(config(8, 64), Box::new(Garbage));
        s.add(seq(1, 3, 0));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.policy_fault, Some(PolicyError::UnknownId(42)));
        assert_eq!(out.scheduled.len(), 1);
    }

    #[test]
    fn prefix_hits_skip_computed_tokens_and_forks_share_blocks() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let mut s = Scheduler::new(config(8, 64), Box::new(Fcfs));
        s.add(seq(1, 9, 0));
        step(&mut s, &mut kv);
        let shared_prompt = s.get(1).unwrap().tokens[..9].to_vec();
        s.add(SchedSeq::new(2, shared_prompt, 100, 0, String::new(), 2));
        let out = step(&mut s, &mut kv);
        let second = out.scheduled.iter().find(|x| x.id == 2).unwrap();
        assert_eq!((second.start, second.num_new), (8, 1), "two full blocks came from the cache");

        s.fork(2, 3, &mut kv);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.copies.len(), 1, "the fork copies the shared partial block on its first write");
        for id in [1, 2, 3] {
            s.remove(id, &mut kv);
        }
        assert_eq!(kv.num_free_blocks(), 16);
    }
}
