//! Locally typical sampling (Meister et al., 2022): keep the tokens whose surprise (-ln p) is
//! closest to the distribution's entropy, up to a cumulative probability `p`, and draw from them.
//!
//! Configuration (JSON, optional): `{"p": 0.95, "top_n": 256}`.
//! Stateless; with a seed, draw k of a sequence uses a generator seeded from (seed, k).

use std::sync::Mutex;

use pagedserve_plugin_sdk::sampler::{export_sampler, softmax, draw, Guest, SampleInput, SampleOutput, SplitMix64};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    pub p: f64,
    pub top_n: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { p: 0.95, top_n: 256 }
    }
}

/// Indices of the candidates kept by typical filtering, most typical first.
pub fn typical_set(probs: &[f64], p: f64) -> Vec<usize> {
    let entropy: f64 = probs.iter().filter(|&&q| q > 0.0).map(|&q| -q * q.ln()).sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let distance = |i: usize| (-probs[i].ln() - entropy).abs();
    order.sort_by(|&a, &b| distance(a).total_cmp(&distance(b)).then(a.cmp(&b)));
    let mut cumulative = 0.0;
    let mut keep = order.len();
    for (k, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative >= p {
            keep = k + 1;
            break;
        }
    }
    order.truncate(keep);
    order
}

pub fn sample_one(input: &SampleInput, config: &Config, u: f64) -> SampleOutput {
    if input.temperature == Some(0.0) {
        return SampleOutput { token: input.token_ids[0], logprob: None };
    }
    let probs = softmax(&input.logits, input.temperature.unwrap_or(1.0));
    let kept = typical_set(&probs, config.p);
    let weights: Vec<f64> = kept.iter().map(|&i| probs[i]).collect();
    let i = kept[draw(&weights, u)];
    SampleOutput { token: input.token_ids[i], logprob: Some(probs[i].ln() as f32) }
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct Typical;

impl Guest for Typical {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = pagedserve_plugin_sdk::parse_config(&config)?;
        if !(config.p > 0.0 && config.p <= 1.0 && (1..=1024).contains(&config.top_n)) {
            return Err("need p in (0, 1] and top_n in 1..=1024".into());
        }
        *CONFIG.lock().unwrap() = Some(config);
        Ok(())
    }

    fn top_n() -> u32 {
        CONFIG.lock().unwrap().as_ref().map_or(Config::default().top_n, |c| c.top_n)
    }

    fn sample(seqs: Vec<SampleInput>) -> Result<Vec<SampleOutput>, String> {
        let config = CONFIG.lock().unwrap().clone().unwrap_or_default();
        let fallback = pagedserve_plugin_sdk::host::now();
        Ok(seqs
            .iter()
            .map(|s| {
                let u = SplitMix64::for_step(s.seed.unwrap_or(fallback ^ s.id), s.generated_tokens).next_f64();
                sample_one(s, &config, u)
            })
            .collect())
    }
}

export_sampler!(Typical);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typical_set_drops_the_too_likely_and_the_too_rare() {
        // One dominant token and a long flat tail: entropy is near the tail's surprise, so a
        // small p keeps tail tokens before the head.
        let mut probs = vec![0.3];
        probs.extend(std::iter::repeat(0.7 / 50.0).take(50));
        let kept = typical_set(&probs, 0.2);
        assert!(!kept.contains(&0), "{kept:?}");
        assert_eq!(typical_set(&probs, 1.0).len(), 51);
    }

    #[test]
    fn seeded_draws_repeat_and_stay_among_candidates() {
        let input = |k| SampleInput {
            id: 1,
            token_ids: vec![5, 9, 11, 40],
            logits: vec![2.0, 1.5, 1.0, 0.2],
            recent_tokens: vec![],
            generated_tokens: k,
            temperature: Some(0.8),
            seed: Some(42),
        };
        let draws: Vec<u32> = (0..30)
            .map(|k| sample_one(&input(k), &Config::default(), SplitMix64::for_step(42, k).next_f64()).token)
            .collect();
        let again: Vec<u32> = (0..30)
            .map(|k| sample_one(&input(k), &Config::default(), SplitMix64::for_step(42, k).next_f64()).token)
            .collect();
        assert_eq!(draws, again);
        assert!(draws.iter().all(|t| [5, 9, 11, 40].contains(t)));
    }
}
