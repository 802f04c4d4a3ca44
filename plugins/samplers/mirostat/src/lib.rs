//! Mirostat v2 (Basu et al., 2021): keeps the surprise (-log2 p) of the generated text near a
//! target `tau` with a feedback loop. Each sequence has a threshold `mu` (starting at 2 tau):
//! candidates more surprising than `mu` are cut, one token is drawn from the rest, and `mu` moves
//! by `eta` times the error between the observed surprise and `tau`.
//!
//! Configuration (JSON, optional): `{"tau": 5.0, "eta": 0.1, "top_n": 256}`.
//! `mu` lives in the instance, per sequence id; a fresh instance (after a fault) starts again at 2 tau.
//! Determinism: with a seed, draw k of a sequence uses a generator seeded from (seed, k).

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::sampler::{export_sampler, softmax, draw, Guest, SampleInput, SampleOutput, SplitMix64};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    pub tau: f64,
    pub eta: f64,
    pub top_n: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { tau: 5.0, eta: 0.1, top_n: 256 }
    }
}

/// Most sequences whose `mu` is kept; past it, those absent from the current call are dropped.
const MAX_TRACKED: usize = 4096;

#[derive(Default)]
pub struct State {
    pub config: Config,
    pub mu: BTreeMap<u64, f64>,
}

impl State {
    /// Picks one token for `input` with uniform draw `u`, updating the sequence's `mu`.
    pub fn sample_one(&mut self, input: &SampleInput, u: f64) -> SampleOutput {
        let tau = self.config.tau;
        let mu = self.mu.entry(input.id).or_insert(2.0 * tau);
        if input.generated_tokens == 0 {
            *mu = 2.0 * tau;
        }
        if input.temperature == Some(0.0) {
            return SampleOutput { token: input.token_ids[0], logprob: None };
        }
        let probs = softmax(&input.logits, input.temperature.unwrap_or(1.0));
        // Candidates come best first: keep the prefix whose surprise is at most mu (at least one).
        let keep = probs.iter().take_while(|&&p| -p.log2() <= *mu).count().max(1);
        let kept = &probs[..keep];
        let total: f64 = kept.iter().sum();
        let i = draw(kept, u);
        let p = kept[i] / total;
        let surprise = -p.log2();
        *mu -= self.config.eta * (surprise - tau);
        SampleOutput { token: input.token_ids[i], logprob: Some(probs[i].ln() as f32) }
    }

    pub fn sample(&mut self, seqs: &[SampleInput], fallback_seed: u64) -> Vec<SampleOutput> {
        if self.mu.len() > MAX_TRACKED {
            let live: std::collections::BTreeSet<u64> = seqs.iter().map(|s| s.id).collect();
            self.mu.retain(|id, _| live.contains(id));
        }
        seqs.iter()
            .map(|s| {
                let seed = s.seed.unwrap_or(fallback_seed ^ s.id);
                let u = SplitMix64::for_step(seed, s.generated_tokens).next_f64();
                self.sample_one(s, u)
            })
            .collect()
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

struct Mirostat;

impl Guest for Mirostat {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = pagedserve_plugin_sdk::parse_config(&config)?;
        if !(config.tau > 0.0 && config.eta > 0.0 && (1..=1024).contains(&config.top_n)) {
            return Err("need tau > 0, eta > 0 and top_n in 1..=1024".into());
        }
        *STATE.lock().unwrap() = Some(State { config, mu: BTreeMap::new() });
        Ok(())
    }

    fn top_n() -> u32 {
        STATE.lock().unwrap().as_ref().map_or(Config::default().top_n, |s| s.config.top_n)
    }

    fn sample(seqs: Vec<SampleInput>) -> Result<Vec<SampleOutput>, String> {
        let mut state = STATE.lock().unwrap();
        let state = state.get_or_insert_with(State::default);
        Ok(state.sample(&seqs, pagedserve_plugin_sdk::host::now()))
    }
}

export_sampler!(Mirostat);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: u64, logits: Vec<f32>, generated: u32, seed: u64) -> SampleInput {
        SampleInput {
            id,
            token_ids: (0..logits.len() as u32).map(|t| t * 10).collect(),
            logits,
            recent_tokens: vec![],
            generated_tokens: generated,
            temperature: None,
            seed: Some(seed),
        }
    }

    #[test]
    fn a_low_threshold_keeps_only_the_likeliest() {
        let mut s = State::default();
        s.mu.insert(1, 0.1); // below any surprise: only the top candidate survives
        for u in [0.0, 0.5, 0.99] {
            s.mu.insert(1, 0.1);
            let out = s.sample_one(&input(1, vec![3.0, 2.0, 1.0], 5, 0), u);
            assert_eq!(out.token, 0);
        }
    }

    #[test]
    fn mu_tracks_tau_and_seeds_repeat() {
        let logits: Vec<f32> = (0..50).map(|i| -(i as f32) * 0.2).collect();
        let run = |seed| {
            let mut s = State::default();
            (0..40).map(|k| s.sample(&[input(7, logits.clone(), k, seed)], 0)[0].token).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        // Surprises of this distribution range from 2.4 bits up: a target of 3 bits is reachable.
        let mut s = State { config: Config { tau: 3.0, ..Config::default() }, ..State::default() };
        for k in 0..200 {
            s.sample(&[input(7, logits.clone(), k, 9)], 0);
        }
        let mu = s.mu[&7];
        assert!(mu > 2.0 && mu < 8.0, "mu {mu} settles near tau");
    }
}
