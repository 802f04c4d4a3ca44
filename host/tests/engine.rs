//! The serving engine in-process, on the real default model: continuous batching gives every
//! request exactly its unloaded output; preemption, prefix caching, copy-on-write forks, aborts and
//! stop strings keep that promise and return every block. Each runs with steps one at a time and
//! pipelined (async scheduling, through `HostPipeline`): the outputs must be the same.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pagedserve::engine::{EngineConfig, EngineError, EngineHandle, FinishReason, GenerateRequest, StreamEvent, Usage};
use pagedserve::metrics::Metrics;
use pagedserve::runner::generate::{GenerateOptions, Generator};
use pagedserve::runner::{CpuBackend, HostPipeline, ModelBackend};
use pagedserve::sampling::SamplingParams;
use pagedserve::sched::{native_policy, SchedulerConfig};

use common::loaded_model;

struct TestEngine {
    handle: EngineHandle,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Runtime,
}

/// What one request produced: per sample, its tokens, text and finish reason.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<Vec<u32>>,
    texts: Vec<String>,
    reasons: Vec<FinishReason>,
    usage: Usage,
}

/// Steps one at a time, then pipelined (async scheduling).
const MODES: [bool; 2] = [false, true];

fn engine(num_blocks: usize, max_num_seqs: usize, max_num_batched_tokens: usize, prefix_caching: bool, pipelined: bool) -> TestEngine {
    engine_with_queue(num_blocks, max_num_seqs, max_num_batched_tokens, prefix_caching, 1024, pipelined)
}

fn engine_with_queue(
    num_blocks: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    prefix_caching: bool,
    max_queue: usize,
    pipelined: bool,
) -> TestEngine {
    let loaded = loaded_model();
    let backend: Box<dyn ModelBackend> = Box::new(CpuBackend::new(loaded.model.clone(), num_blocks, 16));
    let backend: Box<dyn ModelBackend> = if pipelined { Box::new(HostPipeline::new(backend)) } else { backend };
    let metrics = Arc::new(Metrics::new("test"));
    let tokenizer = loaded.tokenizer.clone().expect("tokenizer");
    let config = EngineConfig {
        scheduler: SchedulerConfig::new(max_num_seqs, max_num_batched_tokens),
        max_model_len: 2048,
        max_queue,
        prefix_caching,
        async_scheduling: pipelined,
    };
    let (handle, _thread) =
        EngineHandle::spawn(backend, tokenizer, metrics.clone(), native_policy("fcfs").unwrap(), config);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    TestEngine { handle, metrics, runtime }
}

impl TestEngine {
    fn run_all(&self, requests: Vec<GenerateRequest>) -> Vec<Outcome> {
        self.runtime.block_on(async {
            let streams: Vec<_> = requests
                .into_iter()
                .map(|r| {
                    let n = r.n;
                    (n, self.handle.submit(r).expect("submitted"))
                })
                .collect();
            let mut tasks = Vec::new();
            for (n, mut stream) in streams {
                tasks.push(tokio::spawn(async move {
                    let mut outcome = Outcome {
                        tokens: vec![Vec::new(); n],
                        texts: vec![String::new(); n],
                        reasons: vec![FinishReason::Abort; n],
                        usage: Usage::default(),
                    };
                    while let Some(event) = stream.next().await {
                        match event {
                            StreamEvent::Delta { index, token_ids, text, .. } => {
                                outcome.tokens[index].extend(token_ids);
                                outcome.texts[index].push_str(&text);
                            }
                            StreamEvent::Finished { index, reason, .. } => outcome.reasons[index] = reason,
                            StreamEvent::Done { usage, .. } => outcome.usage = usage,
                            StreamEvent::Error(e) => panic!("request failed: {e}"),
                        }
                    }
                    outcome
                }));
            }
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            outcomes
        })
    }

    /// Runs `prompts` greedily together (prompt i to `max_tokens(i)` tokens) and asserts that each
    /// output is that prompt's output alone (`what` names the run in a failure); returns the
    /// outcomes for further checks.
    fn run_as_if_alone(&self, prompts: &[Vec<u32>], max_tokens: impl Fn(usize) -> usize, what: &str) -> Vec<Outcome> {
        let outcomes = self.run_all(prompts.iter().enumerate().map(|(i, p)| greedy(p.clone(), max_tokens(i))).collect());
        for (i, (prompt, outcome)) in prompts.iter().zip(&outcomes).enumerate() {
            assert_eq!(outcome.tokens[0], alone(prompt, max_tokens(i)), "prompt of {} tokens, {what}", prompt.len());
        }
        outcomes
    }

    fn gauge(&self, name: &str) -> f64 {
        let text = self.metrics.render();
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

/// Distinct prompts of mixed lengths, built from real text.
fn mixed_prompts(count: usize) -> Vec<Vec<u32>> {
    let tokenizer = loaded_model().tokenizer.as_ref().unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in \
                fixed-size blocks, like virtual memory pages, so a serving engine wastes little memory. ";
    let base = tokenizer.encode(&text.repeat(4), false).unwrap();
    (0..count).map(|i| base[i % 7..i % 7 + 3 + (i * 13) % 90].to_vec()).collect()
}

fn alone(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let model = &loaded_model().model;
    let options = GenerateOptions { max_new_tokens: max_tokens, stop_token_ids: Vec::new(), prefill_chunk: None };
    Generator::new(model, 16, 16).generate(&[prompt.to_vec()], &options, |_, _| {}).unwrap().remove(0)
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(prompt, max_tokens) }
}

#[test]
fn concurrent_requests_each_get_their_unloaded_output() {
    let prompts = mixed_prompts(32);
    // Different lengths: requests end on different steps, while others run on.
    let max_tokens = |i: usize| 4 + i % 9;
    for pipelined in MODES {
        let engine = engine(512, 64, 256, true, pipelined);
        let outcomes = engine.run_as_if_alone(&prompts, max_tokens, &format!("pipelined {pipelined}"));
        for (i, (prompt, outcome)) in prompts.iter().zip(&outcomes).enumerate() {
            assert_eq!(outcome.reasons[0], FinishReason::Length);
            assert_eq!(outcome.usage, Usage { prompt_tokens: prompt.len(), completion_tokens: max_tokens(i) });
        }
        assert_eq!(engine.gauge("pagedserve_kv_cache_usage_perc"), 0.0, "every block returned");
    }
}

#[test]
fn prompts_prefilled_in_small_chunks_keep_outputs_identical() {
    // 16 tokens a step: most steps are prefill chunks with nothing to sample, running beside (and,
    // pipelined, ahead of) other sequences' decode steps.
    let prompts = mixed_prompts(6);
    let max_tokens = 8;
    for pipelined in MODES {
        let engine = engine(256, 8, 16, true, pipelined);
        engine.run_as_if_alone(&prompts, |_| max_tokens, &format!("pipelined {pipelined}"));
        assert_eq!(engine.gauge("pagedserve_kv_cache_usage_perc"), 0.0);
    }
}

#[test]
fn preemption_under_a_small_pool_keeps_outputs_identical() {
    // 12 blocks of 16 tokens for 8 sequences that each grow to 40-130 tokens: preemption is forced.
    let prompts = mixed_prompts(8);
    let max_tokens = 40;
    for pipelined in MODES {
        let engine = engine(12, 8, 512, false, pipelined);
        engine.run_as_if_alone(&prompts, |_| max_tokens, &format!("pipelined {pipelined}"));
        assert!(engine.gauge("pagedserve_num_preemptions_total") > 0.0, "the pool was meant to be too small");
        assert_eq!(engine.gauge("pagedserve_kv_cache_usage_perc"), 0.0);
    }
}

#[test]
fn a_shared_prefix_is_served_from_the_cache_with_identical_output() {
    let tokenizer = loaded_model().tokenizer.as_ref().unwrap();
    let system = "You are a meticulous assistant. Answer briefly, cite nothing, and never apologise. ".repeat(4);
    let prompt = |question: &str| tokenizer.encode(&format!("{system}\nQuestion: {question}\nAnswer:"), false).unwrap();
    let (first, second) = (prompt("What is a block table?"), prompt("Why share prefixes?"));
    let engine = engine(256, 8, 512, true, false);
    engine.run_all(vec![greedy(first.clone(), 4)]);
    let hits_before = engine.gauge("pagedserve_prefix_cache_hits_total");
    let outcome = engine.run_all(vec![greedy(second.clone(), 8)]).remove(0);
    let hits = engine.gauge("pagedserve_prefix_cache_hits_total") - hits_before;
    assert!(hits >= 48.0, "the shared system prompt spans several full blocks, got {hits} hit tokens");
    assert_eq!(outcome.tokens[0], alone(&second, 8));
}

#[test]
fn seeded_samples_repeat_alone_and_in_a_busy_batch_and_n_forks_share_the_prompt() {
    let prompt = mixed_prompts(3)[2].clone();
    let seeded = |n| GenerateRequest {
        n,
        sampling: SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(1234), ..SamplingParams::default() },
        ..greedy(prompt.clone(), 12)
    };
    let mut singles = Vec::new();
    for pipelined in MODES {
        let engine = engine(256, 32, 256, true, pipelined);
        let single = engine.run_all(vec![seeded(1)]).remove(0);
        let mut busy: Vec<GenerateRequest> = mixed_prompts(12).into_iter().map(|p| greedy(p, 12)).collect();
        busy.insert(5, seeded(1));
        let in_batch = engine.run_all(busy).remove(5);
        assert_eq!(single.tokens, in_batch.tokens, "same seed, same tokens, whatever else runs");

        let forked = engine.run_all(vec![seeded(3)]).remove(0);
        assert_eq!(forked.tokens[0], single.tokens[0], "sample 0 of n=3 equals the n=1 sample");
        assert_ne!(forked.tokens[1], forked.tokens[0], "samples draw independently");
        assert_eq!(forked.usage.completion_tokens, 36);
        assert_eq!(engine.gauge("pagedserve_kv_cache_usage_perc"), 0.0, "forked blocks all returned");
        singles.push(single);
    }
    assert_eq!(singles[0], singles[1], "pipelining changes no seeded draw");
}

#[test]
fn dropping_a_stream_aborts_and_frees_its_blocks() {
    for pipelined in MODES {
        let engine = engine(256, 8, 256, false, pipelined);
        engine.runtime.block_on(async {
            let mut stream = engine.handle.submit(greedy(mixed_prompts(5)[4].clone(), 500)).unwrap();
            // Wait for a few tokens, then walk away.
            let mut deltas = 0;
            while deltas < 3 {
                if let Some(StreamEvent::Delta { .. }) = stream.next().await {
                    deltas += 1;
                }
            }
            assert!(engine.gauge("pagedserve_kv_cache_usage_perc") > 0.0);
            drop(stream);
            for _ in 0..100 {
                if engine.gauge("pagedserve_kv_cache_usage_perc") == 0.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("blocks were not returned after the abort (pipelined {pipelined})");
        });
    }
}

#[test]
fn the_waiting_queue_is_capped_and_its_count_returns_to_zero() {
    // One running sequence at a time: while one runs, every other request waits.
    let engine = engine_with_queue(256, 1, 256, false, 2, true);
    engine.runtime.block_on(async {
        let prompt = mixed_prompts(5)[4].clone();
        // The second round finds the count back at zero, not drifted by the first.
        for round in 0..2 {
            let mut running = engine.handle.submit(greedy(prompt.clone(), 40)).unwrap();
            while !matches!(running.next().await, Some(StreamEvent::Delta { .. })) {}
            let burst: Vec<_> = (0..8).map(|_| engine.handle.submit(greedy(prompt.clone(), 2))).collect();
            let refused = burst.iter().filter(|r| matches!(r, Err(EngineError::QueueFull(2)))).count();
            assert_eq!(refused, 6, "round {round}: 2 of 8 fit the queue");
            let mut streams: Vec<_> = burst.into_iter().filter_map(Result::ok).collect();
            streams.push(running);
            for stream in &mut streams {
                while let Some(event) = stream.next().await {
                    assert!(!matches!(event, StreamEvent::Error(_)), "round {round}: {event:?}");
                }
            }
        }
    });
}

#[test]
fn stop_strings_and_stop_tokens_end_the_sample_without_leaking() {
    let reference = common::reference();
    let plain = &reference["greedy"]["prompts"][0];
    let prompt: Vec<u32> = plain["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    // The continuation is " Paris.\n\nThe answer is: 2018-01-22 12:12:53.<|im_end|>..."; "01-22" spans tokens.
    for pipelined in MODES {
        let engine = engine(64, 8, 256, false, pipelined);
        let request = GenerateRequest { stop: vec!["01-22".into()], ..greedy(prompt.clone(), 32) };
        // Beside it, a request that runs on: the stopped one's extra pipelined token is dropped.
        let outcome = engine.run_all(vec![request, greedy(prompt.clone(), 32)]).remove(0);
        assert_eq!(outcome.texts[0], " Paris.\n\nThe answer is: 2018-", "pipelined {pipelined}");
        assert_eq!(outcome.reasons[0], FinishReason::Stop);
        assert_eq!(outcome.usage.completion_tokens, outcome.tokens[0].len(), "no dropped token is counted");

        let request = GenerateRequest { stop_token_ids: vec![198], ..greedy(prompt.clone(), 32) };
        let outcome = engine.run_all(vec![request]).remove(0);
        assert_eq!(outcome.tokens[0], vec![7042, 30, 198], "stops at the first newline token");

        // End of sequence is honoured unless ignore_eos: the reference stops at index 29.
        let outcome = engine.run_all(vec![GenerateRequest::greedy(prompt.clone(), 32)]).remove(0);
        assert_eq!(outcome.tokens[0].len(), 30);
        assert_eq!(outcome.texts[0], " Paris.\n\nThe answer is: 2018-01-22 12:12:53.");
        assert_eq!(engine.gauge("pagedserve_kv_cache_usage_perc"), 0.0, "pipelined {pipelined}: every block returned");
    }
}
