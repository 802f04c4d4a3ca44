//! The server under concurrent load, on the real model: continuous batching keeps every output
//! identical to the request's output alone (temperature 0), also when a deliberately small KV pool
//! forces preemptions or prompts are paced at light load; a full waiting queue answers 429.

use pagedserve_tests::Server;
use serde_json::{json, Value};

/// Request `i` of a mixed burst: prompts of 1..=6 sentences, 3..=22 new tokens.
fn mixed_request(i: usize) -> Value {
    let sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A journey of a thousand miles begins with a single step.",
        "Rust is a systems programming language.",
        "The mitochondria is the powerhouse of the cell.",
        "Paris is the capital of France.",
        "Water boils at one hundred degrees Celsius.",
    ];
    let prompt: Vec<&str> = (0..=(i % 6)).map(|k| sentences[(i + k) % sentences.len()]).collect();
    json!({"prompt": format!("{} Fact {i}:", prompt.join(" ")), "max_tokens": 3 + (i * 7) % 20,
           "temperature": 0, "ignore_eos": true})
}

/// Sends every request at once, one thread each; returns the texts in order.
fn burst(server: &Server, requests: &[Value]) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = requests.iter().map(|r| scope.spawn(move || server.complete("/v1/completions", r))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn thirty_two_concurrent_requests_each_give_their_output_alone() {
    let server = Server::start(&["--max-model-len", "512"]);
    let requests: Vec<Value> = (0..32).map(mixed_request).collect();
    let alone: Vec<String> = requests.iter().map(|r| server.complete("/v1/completions", r)).collect();
    let together = burst(&server, &requests);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "request {i} differs under load");
    }
    assert!(server.metric("pagedserve_request_success_total") >= 64.0);
}

#[test]
fn paced_prompts_start_over_several_steps_and_outputs_stay_identical() {
    // Twelve prompts of 12-70 tokens at once: unpaced, the first step would take 128 of them (the
    // CPU's budget); paced at 32, no step of the burst computes more than 32 tokens.
    let server = Server::start(&["--max-model-len", "512", "--light-load-step-tokens", "32"]);
    let requests: Vec<Value> = (0..12)
        .map(|i| {
            let mut request = mixed_request(i);
            request["max_tokens"] = json!(40);
            request
        })
        .collect();
    let alone: Vec<String> = requests.iter().map(|r| server.complete("/v1/completions", r)).collect();
    // A stream that keeps decoding through the burst, so that its first prompt is never alone in
    // the engine (one prompt alone is not paced: nobody waits for it).
    let mut background = server.open_post(
        "/v1/completions",
        &json!({"prompt": "Count slowly:", "max_tokens": 400, "stream": true, "ignore_eos": true, "temperature": 0}),
    );
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let mut chunk = [0u8; 512];
        let n = std::io::Read::read(&mut background, &mut chunk).expect("the background stream answers");
        assert!(n > 0, "the background stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    // Engine steps, all and those of at most 32 tokens (the tokens-a-step histogram).
    let steps_of_at_most_32 = || server.histogram_at_most("pagedserve_iteration_tokens_total", 32.0);
    let before = steps_of_at_most_32();
    let together = burst(&server, &requests);
    let after = steps_of_at_most_32();
    drop(background);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "request {i} differs when paced");
    }
    let (steps, small_steps) = (after.0 - before.0, after.1 - before.1);
    assert!(steps >= 40.0, "the burst took {steps} steps");
    assert_eq!(small_steps, steps, "a step of the burst computed more than 32 tokens");
}

#[test]
fn a_small_kv_pool_preempts_and_outputs_stay_identical() {
    // 24 blocks of 16 tokens: 384 tokens for requests needing ~80 each.
    let server = Server::start(&["--num-kv-blocks", "24", "--max-num-seqs", "16", "--max-model-len", "384"]);
    let requests: Vec<Value> = (0..10)
        .map(|i| {
            json!({"prompt": format!("Request {i}. The history of the number {i} begins in ancient times, when people \
                                       first learned to count sheep, stars and days. Tell me more:"),
                   "max_tokens": 40, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let alone: Vec<String> = requests.iter().map(|r| server.complete("/v1/completions", r)).collect();
    assert_eq!(server.metric("pagedserve_num_preemptions_total"), 0.0, "one request at a time fits");
    let together = burst(&server, &requests);
    assert!(server.metric("pagedserve_num_preemptions_total") > 0.0, "the burst should preempt:\n{}", server.log());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "request {i} differs after preemption");
    }
}

#[test]
fn a_full_queue_answers_429() {
    let server = Server::start(&["--max-queue", "1", "--max-num-seqs", "1"]);
    let request = json!({"prompt": "Tell me a long story.", "max_tokens": 24, "ignore_eos": true});
    let replies: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let request = &request;
                let server = &server;
                scope.spawn(move || {
                    let reply = server.post("/v1/completions", request);
                    (reply.status, reply.json())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<&Value> = replies.iter().filter(|(s, _)| *s == 429).map(|(_, b)| b).collect();
    let served = replies.iter().filter(|(s, _)| *s == 200).count();
    assert!(!refused.is_empty(), "expected some 429s: {replies:?}");
    assert!(served >= 1, "expected some 200s: {replies:?}");
    assert_eq!(refused.len() + served, replies.len(), "{replies:?}");
    assert_eq!(refused[0]["error"]["code"], 429);
    assert!(refused[0]["error"]["message"].as_str().unwrap().contains("queue is full"));
    let scrape = server.scrape();
    let queue_full: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "pagedserve_request_failure_total" && s.labels.get("reason") == Some("queue_full"))
        .map(|s| if let prometheus_parse::Value::Counter(v) = s.value { v } else { 0.0 })
        .sum();
    assert_eq!(queue_full as usize, refused.len());
    // The server keeps serving.
    assert_eq!(server.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2})).status, 200);
}
