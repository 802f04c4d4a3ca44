//! KV-cache behaviour seen through HTTP on the real model: automatic prefix caching of a shared
//! system prompt, blocks coming back when a client disconnects mid-request, and the FP8 cache.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use pagedserve_tests::{reference, Server};
use serde_json::json;

fn chat(system: &str, question: &str) -> serde_json::Value {
    json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
           "max_tokens": 12, "temperature": 0, "ignore_eos": true})
}

#[test]
fn a_shared_system_prompt_hits_the_prefix_cache_with_identical_output() {
    let system = "You are a meticulous assistant for a public library. You answer questions about opening hours, \
                  borrowing rules, late fees, inter-library loans, reading rooms, printing, study carrels and events. \
                  Always answer briefly and politely, and mention the library card number format when relevant. \
                  Never invent policies that are not listed here.";
    let server = Server::start(&[]);
    let prompt_tokens = server.post_ok("/tokenize", &json!({"messages": chat(system, "x")["messages"]}))["count"].as_u64().unwrap();
    assert!(prompt_tokens > 3 * 16 + 8, "the system prompt spans more than 3 blocks ({prompt_tokens} tokens)");

    let first = server.complete("/v1/chat/completions", &chat(system, "When do you open on Sundays?"));
    let hits = server.metric("pagedserve_prefix_cache_hits_total");
    let second = server.complete("/v1/chat/completions", &chat(system, "How much is the late fee?"));
    let gained = server.metric("pagedserve_prefix_cache_hits_total") - hits;
    assert!(gained >= 48.0, "the second request should reuse at least 3 blocks, gained {gained} tokens");
    assert_eq!(server.complete("/v1/chat/completions", &chat(system, "When do you open on Sundays?")), first);

    let uncached = Server::start(&["--no-prefix-caching"]);
    assert_eq!(uncached.complete("/v1/chat/completions", &chat(system, "How much is the late fee?")), second);
    assert_eq!(uncached.metric("pagedserve_prefix_cache_hits_total"), 0.0);
}

#[test]
fn a_client_that_disconnects_gives_its_blocks_back() {
    let server = Server::start(&[]);
    let baseline = server.metric("pagedserve_kv_cache_usage_perc");
    let aborted = || {
        server.scrape().samples.iter().filter(|s| s.metric == "pagedserve_request_success_total" && s.labels.get("finished_reason") == Some("abort")).map(|s| if let prometheus_parse::Value::Counter(v) = s.value { v } else { 0.0 }).sum::<f64>()
    };
    let long = json!({"prompt": "Write a very long essay about the sea.", "max_tokens": 2000, "ignore_eos": true, "stream": true});

    // Streaming: read a few chunks, then hang up.
    let socket = server.open_post("/v1/completions", &long);
    let mut reader = BufReader::new(socket);
    let mut data_lines = 0;
    let mut line = String::new();
    while data_lines < 5 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        if line.starts_with("data: {") {
            data_lines += 1;
        }
    }
    assert!(server.metric("pagedserve_kv_cache_usage_perc") > baseline, "the request holds blocks while it runs");
    drop(reader);
    server.wait_for_kv_usage(baseline, Duration::from_secs(10));
    assert_eq!(aborted(), 1.0);

    // Non-streaming: the handler owns the request, so hanging up aborts it too.
    let mut long = long.clone();
    long["stream"] = false.into();
    let socket = server.open_post("/v1/completions", &long);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("pagedserve_kv_cache_usage_perc") <= baseline {
        assert!(Instant::now() < deadline, "the non-streamed request never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(socket);
    server.wait_for_kv_usage(baseline, Duration::from_secs(10));
    assert_eq!(aborted(), 2.0);
    assert!(server.log().contains("client went away"), "{}", server.log());
}

/// The `cache_config_info` series' labels: (block size, blocks, cache type).
fn cache_config(server: &Server) -> (String, usize, String) {
    let scrape = server.scrape();
    let sample = scrape.samples.iter().find(|s| s.metric == "pagedserve_cache_config_info").expect("cache_config_info exported");
    let label = |name: &str| sample.labels.get(name).unwrap_or_else(|| panic!("label {name}")).to_string();
    (label("block_size"), label("num_gpu_blocks").parse().unwrap(), label("cache_dtype"))
}

#[test]
fn an_fp8_kv_cache_holds_four_times_the_blocks_and_serves_the_plain_prompts_as_before() {
    let fp8 = Server::start(&["--kv-cache-dtype", "fp8"]);
    let exact = Server::start(&[]);
    let (block_size, fp8_blocks, dtype) = cache_config(&fp8);
    assert_eq!((block_size.as_str(), dtype.as_str()), ("16", "fp8_e4m3"));
    let (_, f32_blocks, dtype) = cache_config(&exact);
    assert_eq!(dtype, "auto");
    // The same --kv-cache-memory-gb: one byte a value instead of float32's four.
    assert_eq!(fp8_blocks / 4, f32_blocks, "{fp8_blocks} FP8 blocks against {f32_blocks}");
    for prompt in reference()["greedy"]["prompts"].as_array().unwrap().iter().filter(|p| p["kind"] != "chat") {
        let body = json!({"prompt": prompt["prompt_text"], "max_tokens": 32, "temperature": 0, "ignore_eos": true});
        let text = fp8.complete("/v1/completions", &body);
        assert_eq!(text, prompt["new_text_skip_special"].as_str().unwrap(), "{}", prompt["prompt_text"]);
        assert_eq!(text, exact.complete("/v1/completions", &body));
    }
    assert_eq!(fp8.metric("pagedserve_kv_cache_usage_perc"), 0.0, "every block returned");
}
