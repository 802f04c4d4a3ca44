//! One sequence's sampler: applies bias and penalties to its logits, then picks a token greedily
//! or from the tempered, top-k / top-p / min-p filtered distribution with its own generator.
//!
//! Log-probs reported are those of the model's raw distribution (before penalties and
//! temperature), as OpenAI's API and vLLM's default report them.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;
use crate::constraint::Constraint;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-prob of `token` under the raw distribution.
    pub logprob: f32,
    /// The most likely alternatives, best first (empty unless log-probs were asked for).
    pub top: Vec<TokenLogprob>,
}

pub struct SequenceSampler {
    params: SamplingParams,
    rng: StdRng,
    /// Seed of the device sampler's counter-based generator (`cuda::sampling`): the request's
    /// seed mixed with the sample index as for `rng`, or a random one for unseeded requests.
    device_seed: u64,
    /// Tokens observed so far: the device generator's draw counter.
    num_observed: u64,
    /// Occurrences of each token generated so far (for presence / frequency penalties).
    output_counts: HashMap<u32, u32>,
    /// Distinct tokens of the prompt, sorted (for the repetition penalty; a set, so deduplicating
    /// changes nothing).
    prompt_tokens: Vec<u32>,
    /// What the output must match: tokens it does not allow next are masked after the bias and
    /// penalties, and every observed token advances it.
    constraint: Option<Constraint>,
}

impl SequenceSampler {
    /// `sample_index` separates the `n` samples of one seeded request.
    pub fn new(params: SamplingParams, prompt_tokens: &[u32], sample_index: u64) -> Self {
        let (rng, device_seed) = match params.seed {
            Some(seed) => {
                let mixed = seed.wrapping_add(sample_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                (StdRng::seed_from_u64(mixed), mixed)
            }
            None => (StdRng::from_os_rng(), rand::random()),
        };
        let mut prompt_tokens = if params.repetition_penalty != 1.0 { prompt_tokens.to_vec() } else { Vec::new() };
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        SequenceSampler { params, rng, device_seed, num_observed: 0, output_counts: HashMap::new(), prompt_tokens, constraint: None }
    }

    /// The sequence's output must match `constraint` (its own copy: it advances with the output).
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    pub fn constraint(&self) -> Option<&Constraint> {
        self.constraint.as_ref()
    }

    pub fn constraint_mut(&mut self) -> Option<&mut Constraint> {
        self.constraint.as_mut()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token the sequence emitted (the sampled one, or one forced from outside).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
        self.num_observed += 1;
        if let Some(constraint) = &mut self.constraint {
            constraint.commit(token);
        }
    }

    /// Seed of the device generator (see `device_seed` in the struct).
    pub fn device_seed(&self) -> u64 {
        self.device_seed
    }

    /// Tokens observed so far; the device generator draws token `t` of step `s` from
    /// `hash(device_seed, s, t)`, so a draw depends on nothing else in the batch.
    pub fn num_observed(&self) -> u64 {
        self.num_observed
    }

    /// Occurrences of each token generated so far.
    pub fn output_counts(&self) -> &HashMap<u32, u32> {
        &self.output_counts
    }

    /// Distinct prompt tokens, sorted (empty unless the repetition penalty is on).
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt_tokens
    }

    /// Computes the constraint's mask for the next token if it is not known yet (see
    /// `Constraint::prepare`); sampling needs it.
    pub fn prepare_constraint(&mut self) {
        if let Some(constraint) = &mut self.constraint {
            constraint.prepare();
        }
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.prepare_constraint();
        let raw_logprobs = self.params.logprobs.map(|_| log_softmax_f64(logits));
        self.apply_bias_and_penalties(logits);
        let token = if self.params.is_greedy() { argmax(logits) } else { self.sample_random(logits) };
        self.observe(token as u32);
        let (logprob, top) = match (&raw_logprobs, self.params.logprobs) {
            (Some(lp), Some(k)) => (lp[token] as f32, top_k_logprobs(lp, k)),
            _ => (f32::NAN, Vec::new()),
        };
        Sampled { token: token as u32, logprob, top }
    }

    /// Adds the logit bias and applies the penalties to `logits` (what `sample` does first), then
    /// the constraint's mask.
    pub fn apply_bias_and_penalties(&self, logits: &mut [f32]) {
        self.apply_bias_and_penalties_only(logits);
        if let Some(constraint) = &self.constraint {
            constraint.mask_logits(logits);
        }
    }

    fn apply_bias_and_penalties_only(&self, logits: &mut [f32]) {
        for (&token, &bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let penalize = |l: &mut f32| *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            let mut seen = std::collections::HashSet::new();
            for &t in self.prompt_tokens.iter().chain(self.output_counts.keys()) {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        penalize(l);
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> usize {
        let candidates = self.filtered(logits);
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(token, weight) in &candidates {
            if target < weight {
                return token;
            }
            target -= weight;
        }
        candidates.last().map_or(0, |c| c.0)
    }

    /// The tokens a random draw may pick from `logits` (after bias and penalties) with their
    /// weights before normalisation: tempered, then cut by top-k, min-p and top-p in that order.
    /// Best first when any cut applies, else in token order. The reference distribution the
    /// device sampler is checked against.
    pub fn filtered(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates as (token, probability before normalisation), best first once sorted.
        let mut candidates: Vec<(usize, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) * inv_t).exp())).collect();
        let k = if p.top_k == 0 { candidates.len() } else { p.top_k.min(candidates.len()) };
        let needs_order = k < candidates.len() || p.top_p < 1.0 || p.min_p > 0.0;
        if needs_order {
            if k < candidates.len() {
                // Ties at the cut keep the lowest token ids: the set is the same on every
                // backend (the GPU sampler cuts in the same order).
                candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                candidates.truncate(k);
            }
            candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.min_p > 0.0 {
                let threshold = candidates[0].1 * p.min_p;
                let keep = candidates.iter().take_while(|c| c.1 >= threshold).count().max(1);
                candidates.truncate(keep);
            }
            if p.top_p < 1.0 {
                let total: f32 = candidates.iter().map(|c| c.1).sum();
                let mut cumulative = 0.0;
                let mut keep = candidates.len();
                for (i, c) in candidates.iter().enumerate() {
                    cumulative += c.1 / total;
                    if cumulative >= p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
                candidates.truncate(keep);
            }
        }
        candidates
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax` accumulated in float64.
pub fn log_softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&x| x as f64 - log_z).collect()
}

fn top_k_logprobs(logprobs: &[f64], k: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    // Best first, the lowest token id first among equals (also at the cut, so the list is the
    // same on every backend).
    let order = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, order);
    idx.truncate(k);
    idx.sort_unstable_by(order);
    idx.into_iter().map(|i| TokenLogprob { token: i as u32, logprob: logprobs[i] as f32 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { temperature: 1.0, ..Default::default() }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let p = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
        let mut s = SequenceSampler::new(p, &[], 0);
        let out = s.sample(&mut [0.0, 2.0, 1.0]);
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![1, 2]);
        let z = (1.0f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((out.logprob as f64 - (2.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn ties_at_a_cut_keep_the_lowest_token_ids() {
        // Many equal logits: the top-k set and the top log-probs are the lowest ids among them.
        let mut logits = vec![1.0f32; 64];
        logits[40] = 2.0;
        let s = SequenceSampler::new(SamplingParams { top_k: 4, ..params() }, &[], 0);
        let mut kept: Vec<usize> = s.filtered(&logits).iter().map(|c| c.0).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![0, 1, 2, 40]);
        let p = SamplingParams { temperature: 0.0, logprobs: Some(3), ..Default::default() };
        let out = SequenceSampler::new(p, &[], 0).sample(&mut logits.clone());
        assert_eq!(out.top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![40, 0, 1]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = SequenceSampler::new(SamplingParams { seed: Some(seed), ..params() }, &[], 0);
            (0..20).map(|_| s.sample(&mut logits.clone()).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let logits = vec![5.0, 4.0, 0.0, -1.0, -2.0];
        let support = |p: SamplingParams| {
            let mut s = SequenceSampler::new(SamplingParams { seed: Some(1), ..p }, &[], 0);
            let mut seen: Vec<u32> = (0..400).map(|_| s.sample(&mut logits.clone()).token).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        assert_eq!(support(SamplingParams { top_k: 2, ..params() }), vec![0, 1]);
        // p(0) = 0.72, p(0)+p(1) = 0.99: top_p 0.9 keeps two tokens.
        assert_eq!(support(SamplingParams { top_p: 0.9, ..params() }), vec![0, 1]);
        assert_eq!(support(SamplingParams { min_p: 0.5, ..params() }), vec![0]);
        assert_eq!(support(SamplingParams { temperature: 2.0, ..params() }).len(), 5, "no filter: every token can come up");
    }

    #[test]
    fn penalties_and_bias_change_the_greedy_choice() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let mut s = SequenceSampler::new(SamplingParams { logit_bias: [(2, 10.0)].into(), ..greedy.clone() }, &[], 0);
        assert_eq!(s.sample(&mut [1.0, 2.0, 0.0]).token, 2);

        let mut s = SequenceSampler::new(SamplingParams { frequency_penalty: 1.5, ..greedy.clone() }, &[], 0);
        assert_eq!(s.sample(&mut [1.0, 2.0]).token, 1);
        assert_eq!(s.sample(&mut [1.0, 2.0]).token, 0, "2.0 - 1.5 < 1.0");

        // Repetition penalty covers the prompt: logit 2.0 of prompt token 1 becomes 2.0 / 4.
        let mut s = SequenceSampler::new(SamplingParams { repetition_penalty: 4.0, ..greedy }, &[1], 0);
        assert_eq!(s.sample(&mut [1.0, 2.0]).token, 0);
    }
}
