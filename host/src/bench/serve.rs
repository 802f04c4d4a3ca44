//! The serving engine under a ShareGPT-like load, in-process: `concurrency` closed-loop clients
//! each send their next request when the previous one finishes, until `num_requests` are done.
//! Prompt and output lengths are drawn from log-normal distributions shaped like ShareGPT's
//! (long-tailed; means near 165 prompt and 190 output tokens), with a fixed seed so every run and
//! every baseline replays the same workload (`--dump-workload` writes it as JSON).
//!
//! Reported: output and total token throughput, time to first token and time per output token,
//! preemptions, and KV-cache occupancy: the share of allocated KV slots (blocks in use times the
//! block size) that hold a computed token, averaged over engine steps weighted by slots.

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::median;
use crate::engine::{EngineCore, GenerateRequest, StreamEvent};
use crate::metrics::Metrics;
use crate::runner::ModelBackend;
use crate::sched::{Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// `count` requests with ShareGPT-like lengths, at most `max_len` tokens each in total.
pub fn sharegpt_like_workload(count: usize, vocab: usize, max_len: usize, seed: u64) -> Vec<WorkloadRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let prompt_len = LogNormal::new(110f64.ln(), 0.9).expect("valid distribution");
    let output_len = LogNormal::new(140f64.ln(), 0.8).expect("valid distribution");
    let span = vocab.saturating_sub(100).max(1);
    (0..count)
        .map(|i| {
            let p = (prompt_len.sample(&mut rng) as usize).clamp(4, 1024).min(max_len / 2);
            let o = (output_len.sample(&mut rng) as usize).clamp(4, 512).min(max_len - p);
            let prompt = (0..p).map(|t| ((i * 7919 + t * 104_729 + 17) % span + 100) as u32).collect();
            WorkloadRequest { prompt, max_tokens: o }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeResult {
    pub requests: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub output_tokens_per_second: f64,
    pub total_tokens_per_second: f64,
    pub median_ttft_ms: f64,
    pub median_tpot_ms: f64,
    pub preemptions: u64,
    /// Share of allocated KV slots holding computed tokens (0 to 1).
    pub kv_occupancy: f64,
    pub steps: usize,
    /// The scheduling policy's name (native `fcfs`, or the Wasm plugin's).
    pub policy: String,
    /// Policy answers rejected (the step then ran native FCFS).
    pub policy_faults: u64,
    /// Mean wall time per engine step of each phase (`schedule`, `forward`, `process`; see
    /// `Metrics::engine_step_phase`): what is not `forward` is the host's overhead.
    pub mean_phase_ms: [(String, f64); 3],
}

pub struct ServeOptions {
    pub num_requests: usize,
    pub concurrency: usize,
    pub scheduler: SchedulerConfig,
    pub max_model_len: usize,
    pub seed: u64,
    /// Pipeline the engine's steps (the backend must pipeline: see `ModelBackend::pipelined`).
    pub async_scheduling: bool,
}

struct InFlight {
    events: UnboundedReceiver<StreamEvent>,
    sent: Instant,
    first_token: Option<Instant>,
    tokens: usize,
}

/// Step times around policy swaps (`--swap-every`): whether a swap stalls serving.
#[derive(Debug, Clone, Serialize)]
pub struct SwapTiming {
    pub swaps: usize,
    /// Longest time the swap itself took (between two steps).
    pub max_swap_us: f64,
    pub median_step_ms: f64,
    /// Longest step right after a swap (the new policy's first call included).
    pub max_step_after_swap_ms: f64,
    /// Longest of the other steps.
    pub max_other_step_ms: f64,
}

pub fn run(
    backend: Box<dyn ModelBackend>,
    tokenizer: Arc<Tokenizer>,
    policy: Box<dyn crate::sched::SchedulingPolicy>,
    options: &ServeOptions,
) -> anyhow::Result<ServeResult> {
    run_with_swaps(backend, tokenizer, vec![policy], None, options).map(|(result, _)| result)
}

/// `run`, swapping round-robin through `policies` every `swap_every` steps (the engine swaps
/// between steps the same way), and timing the steps around the swaps.
pub fn run_with_swaps(
    backend: Box<dyn ModelBackend>,
    tokenizer: Arc<Tokenizer>,
    mut policies: Vec<Box<dyn crate::sched::SchedulingPolicy>>,
    swap_every: Option<usize>,
    options: &ServeOptions,
) -> anyhow::Result<(ServeResult, Option<SwapTiming>)> {
    anyhow::ensure!(!policies.is_empty(), "no scheduling policy");
    let policy = policies.remove(0);
    let vocab = backend.config().vocab_size;
    let workload = sharegpt_like_workload(options.num_requests, vocab, options.max_model_len, options.seed);
    let metrics = Arc::new(Metrics::new("bench"));
    let policy_name = policy.name().to_string();
    let scheduler = Scheduler::new(options.scheduler, policy);
    let mut core = EngineCore::new(backend, tokenizer, metrics.clone(), scheduler, true, options.max_model_len);
    core.set_async_scheduling(options.async_scheduling);

    let started = Instant::now();
    let mut next = 0;
    let mut in_flight: Vec<InFlight> = Vec::new();
    let (mut ttfts, mut tpots) = (Vec::new(), Vec::new());
    let (mut occupied, mut allocated) = (0usize, 0usize);
    let (mut prompt_tokens, mut output_tokens, mut steps) = (0, 0, 0);
    let (mut step_ms, mut after_swap_ms, mut swap_us) = (Vec::new(), Vec::new(), Vec::new());
    let mut just_swapped = false;
    while next < workload.len() || !in_flight.is_empty() {
        while in_flight.len() < options.concurrency && next < workload.len() {
            let w = &workload[next];
            let request = GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(w.prompt.clone(), w.max_tokens) };
            let (tx, rx) = unbounded_channel();
            core.add_request(next as u64 + 1, request, tx);
            prompt_tokens += w.prompt.len();
            in_flight.push(InFlight { events: rx, sent: Instant::now(), first_token: None, tokens: 0 });
            next += 1;
        }
        if let Some(every) = swap_every {
            if steps > 0 && steps % every.max(1) == 0 && !policies.is_empty() {
                let started = Instant::now();
                let next = policies.remove(0);
                policies.push(core.set_policy(next));
                swap_us.push(started.elapsed().as_secs_f64() * 1e6);
                just_swapped = true;
            }
        }
        let step_started = Instant::now();
        core.step();
        let ms = step_started.elapsed().as_secs_f64() * 1e3;
        if std::mem::take(&mut just_swapped) {
            after_swap_ms.push(ms);
        } else {
            step_ms.push(ms);
        }
        steps += 1;
        let (tokens, slots) = core.kv_occupancy();
        occupied += tokens;
        allocated += slots;
        let now = Instant::now();
        in_flight.retain_mut(|r| {
            while let Ok(event) = r.events.try_recv() {
                match event {
                    StreamEvent::Delta { token_ids, .. } => {
                        r.first_token.get_or_insert(now);
                        r.tokens += token_ids.len();
                    }
                    StreamEvent::Done { .. } | StreamEvent::Error(_) => {
                        let first = r.first_token.unwrap_or(now);
                        ttfts.push((first - r.sent).as_secs_f64());
                        if r.tokens > 1 {
                            tpots.push((now - first).as_secs_f64() / (r.tokens - 1) as f64);
                        }
                        output_tokens += r.tokens;
                        return false;
                    }
                    StreamEvent::Finished { .. } => {}
                }
            }
            true
        });
        if steps > 10_000_000 {
            anyhow::bail!("the benchmark did not converge");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let max = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
    let swaps = swap_every.map(|_| SwapTiming {
        swaps: swap_us.len(),
        max_swap_us: max(&swap_us),
        median_step_ms: median(&mut step_ms.clone()),
        max_step_after_swap_ms: max(&after_swap_ms),
        max_other_step_ms: max(&step_ms),
    });
    let result = ServeResult {
        requests: workload.len(),
        concurrency: options.concurrency,
        seconds,
        prompt_tokens,
        output_tokens,
        output_tokens_per_second: output_tokens as f64 / seconds,
        total_tokens_per_second: (prompt_tokens + output_tokens) as f64 / seconds,
        median_ttft_ms: median(&mut ttfts) * 1e3,
        median_tpot_ms: median(&mut tpots) * 1e3,
        preemptions: metrics.num_preemptions.get(),
        kv_occupancy: if allocated == 0 { 0.0 } else { occupied as f64 / allocated as f64 },
        steps,
        policy_faults: metrics.scheduler_policy_faults.with_label_values(&[&policy_name, "invalid_output"]).get()
            + metrics.scheduler_policy_faults.with_label_values(&[&policy_name, "failed"]).get(),
        policy: policy_name,
        mean_phase_ms: ["schedule", "forward", "process"].map(|phase| {
            let h = metrics.engine_step_phase.with_label_values(&[phase]);
            (phase.to_string(), h.get_sample_sum() * 1e3 / h.get_sample_count().max(1) as f64)
        }),
    };
    Ok((result, swaps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_deterministic_long_tailed_and_bounded() {
        let a = sharegpt_like_workload(500, 49152, 2048, 7);
        let b = sharegpt_like_workload(500, 49152, 2048, 7);
        assert_eq!(a.iter().map(|r| r.prompt.len()).collect::<Vec<_>>(), b.iter().map(|r| r.prompt.len()).collect::<Vec<_>>());
        let mean_prompt = a.iter().map(|r| r.prompt.len()).sum::<usize>() as f64 / 500.0;
        let mean_output = a.iter().map(|r| r.max_tokens).sum::<usize>() as f64 / 500.0;
        assert!((120.0..220.0).contains(&mean_prompt), "{mean_prompt}");
        assert!((140.0..240.0).contains(&mean_output), "{mean_output}");
        assert!(a.iter().all(|r| r.prompt.len() + r.max_tokens <= 2048 && r.prompt.len() >= 4));
        assert!(a.iter().any(|r| r.prompt.len() > 400), "long tail");
    }
}
