//! The OpenAI-compatible HTTP API of the real `pagedserve serve`, on the real model: reference
//! greedy outputs through both endpoints, streaming equal to non-streaming (multi-byte text, stop
//! strings that span tokens), seeded sampling, tokenize/detokenize, /metrics and the error
//! contract. One server is shared by the tests of this file.

use std::sync::OnceLock;

use pagedserve_tests::{ids, reference, stream_text, Server};
use serde_json::{json, Value};

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&["--max-model-len", "1024"]))
}

fn greedy_prompts() -> Vec<Value> {
    reference()["greedy"]["prompts"].as_array().unwrap().clone()
}

#[test]
fn completions_and_chat_reproduce_the_reference_greedy_outputs() {
    let server = server();
    let mut plain_texts = Vec::new();
    for prompt in greedy_prompts() {
        let expected = prompt["new_text_skip_special"].as_str().unwrap();
        let prompt_ids = ids(&prompt["prompt_ids"]);
        let params = json!({"max_tokens": 32, "temperature": 0, "ignore_eos": true});
        let mut body = params.clone();
        let answer = if prompt["kind"] == "chat" {
            body["messages"] = prompt["messages"].clone();
            server.post_ok("/v1/chat/completions", &body)
        } else {
            body["prompt"] = prompt["prompt_text"].clone();
            plain_texts.push((prompt["prompt_text"].clone(), expected.to_string()));
            server.post_ok("/v1/completions", &body)
        };
        let choice = &answer["choices"][0];
        let text = choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap();
        assert_eq!(text, expected, "{}", prompt["prompt_text"]);
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(answer["usage"]["prompt_tokens"], prompt_ids.len());
        assert_eq!(answer["usage"]["completion_tokens"], 32);
        assert_eq!(answer["usage"]["total_tokens"], prompt_ids.len() + 32);
        assert!(answer["id"].as_str().unwrap().starts_with(if prompt["kind"] == "chat" { "chatcmpl-" } else { "cmpl-" }));

        // The same prompt as token ids gives the same continuation.
        let mut body = params.clone();
        body["prompt"] = json!(prompt_ids);
        assert_eq!(server.complete("/v1/completions", &body), expected, "token-id prompt {}", prompt["prompt_text"]);
    }

    // A batch of prompts: one choice per prompt, in order, with usage over all of them.
    let mut body = json!({"max_tokens": 32, "temperature": 0, "ignore_eos": true});
    body["prompt"] = json!(plain_texts.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>());
    let answer = server.post_ok("/v1/completions", &body);
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), plain_texts.len());
    for (i, (_, expected)) in plain_texts.iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        assert_eq!(choices[i]["text"], expected.as_str());
    }
    assert_eq!(answer["usage"]["completion_tokens"], 32 * plain_texts.len());
}

#[test]
fn a_pipelined_server_gives_the_same_outputs() {
    // Async scheduling forced on the CPU: the engine's pipelined path (placeholder tokens fed from
    // the previous step, dropped tokens after a stop) serves every prompt at once, streamed and
    // not, and each gets the reference continuation; a stop string still ends the text before it.
    let pipelined = Server::start(&["--max-model-len", "1024", "--async-scheduling", "on"]);
    let prompts = greedy_prompts();
    std::thread::scope(|scope| {
        let runs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let pipelined = &pipelined;
                scope.spawn(move || {
                    let mut body = json!({"max_tokens": 32, "temperature": 0, "ignore_eos": true, "prompt": ids(&prompt["prompt_ids"])});
                    let expected = prompt["new_text_skip_special"].as_str().unwrap();
                    if i % 2 == 0 {
                        assert_eq!(pipelined.complete("/v1/completions", &body), expected);
                    } else {
                        body["stream"] = json!(true);
                        assert_eq!(stream_text(&pipelined.stream("/v1/completions", &body), 0).0, expected);
                    }
                })
            })
            .collect();
        for run in runs {
            run.join().unwrap();
        }
    });
    let plain = &prompts[0];
    let body = json!({"prompt": ids(&plain["prompt_ids"]), "max_tokens": 32, "temperature": 0, "stop": ["01-22"]});
    let answer = pipelined.post_ok("/v1/completions", &body);
    assert_eq!(answer["choices"][0]["text"], " Paris.\n\nThe answer is: 2018-");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(pipelined.metric("pagedserve_kv_cache_usage_perc"), 0.0, "every block returned");
}

#[test]
fn n_samples_of_several_prompts_are_indexed_prompt_major() {
    let server = server();
    let reference = greedy_prompts();
    let first = reference[0]["prompt_text"].as_str().unwrap();
    let second = reference[1]["prompt_text"].as_str().unwrap();
    let alone = |p: &str| server.complete("/v1/completions", &json!({"prompt": p, "max_tokens": 6, "temperature": 0}));
    let (a, b) = (alone(first), alone(second));
    let answer = server.post_ok(
        "/v1/completions",
        &json!({"prompt": [first, second], "n": 2, "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    );
    let texts: Vec<&str> = answer["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, [a.as_str(), a.as_str(), b.as_str(), b.as_str()]);
    let logprobs = &answer["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(logprobs["text_offset"][0], 0);
    assert!(logprobs["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    assert!(logprobs["top_logprobs"][0].as_object().unwrap().len() >= 2);
}

/// Streams `body` and checks the chunks' text and finish reason equal the non-streamed answer.
fn assert_stream_matches(path: &str, body: &Value) -> (String, Value) {
    let server = server();
    let answer = server.post_ok(path, body);
    let choice = &answer["choices"][0];
    let text = choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap().to_string();
    let chunks = server.stream(path, body);
    let (streamed, finish) = stream_text(&chunks, 0);
    assert_eq!(streamed, text, "{body}");
    assert_eq!(finish.as_deref(), choice["finish_reason"].as_str());
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == id), "one id per stream");
    if path.contains("chat") {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "the first chat chunk carries the role");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    }
    (text, answer)
}

#[test]
fn streaming_equals_non_streaming_for_multibyte_text() {
    let (text, _) = assert_stream_matches(
        "/v1/completions",
        &json!({"prompt": "北京是中国的首都。上海是", "max_tokens": 24, "temperature": 0}),
    );
    assert!(text.chars().any(|c| c as u32 > 0x2E80), "expected CJK text, got {text:?}");
    let (text, _) = assert_stream_matches(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Translate to Chinese: I love you."}], "max_tokens": 24, "temperature": 0}),
    );
    assert!(!text.is_ascii(), "expected non-ASCII text, got {text:?}");
}

#[test]
fn a_stop_string_spanning_tokens_ends_the_text_before_it() {
    // Greedy: " Paris.\n\nThe answer is: 2018-01-22 12:12:53.\n"; digits are single tokens, so
    // "12:53" spans five tokens and first appears at the second "12".
    let body = json!({"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0, "stop": ["12:53", "never"]});
    let (text, answer) = assert_stream_matches("/v1/completions", &body);
    assert_eq!(text, " Paris.\n\nThe answer is: 2018-01-22 12:");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["choices"][0]["stop_reason"], "12:53");
    let chunks = server().stream("/v1/completions", &body);
    assert!(chunks.iter().all(|c| !c["choices"][0]["text"].as_str().unwrap_or("").contains('5')), "stop text leaked");

    let mut body = body.clone();
    body["include_stop_str_in_output"] = true.into();
    let (text, _) = assert_stream_matches("/v1/completions", &body);
    assert_eq!(text, " Paris.\n\nThe answer is: 2018-01-22 12:12:53");

    // A chat answer cut by a stop string ("::-1" spans tokens in "input_str[::-1]").
    let body = json!({"messages": [{"role": "user", "content": "Write a Python function that reverses a string."}],
                      "max_tokens": 32, "temperature": 0, "stop": "::-1"});
    let (text, answer) = assert_stream_matches("/v1/chat/completions", &body);
    assert!(text.ends_with("return input_str["), "{text:?}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
}

#[test]
fn stream_options_include_usage_adds_a_final_usage_chunk() {
    let body = json!({"prompt": "1, 2, 3,", "max_tokens": 5, "temperature": 0, "stream_options": {"include_usage": true}});
    let chunks = server().stream("/v1/completions", &body);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["prompt_tokens"], 8);
    assert_eq!(last["usage"]["completion_tokens"], 5);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn a_seeded_sampled_request_repeats_alone_and_under_load() {
    let server = server();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 1234, "ignore_eos": true});
    let first = server.complete("/v1/completions", &body);
    assert_eq!(server.complete("/v1/completions", &body), first);
    let other = server.complete("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 99, "ignore_eos": true}));
    assert_ne!(other, first, "another seed draws other tokens");
    std::thread::scope(|scope| {
        let load: Vec<_> = (0..4)
            .map(|i| {
                scope.spawn(move || {
                    server.complete(
                        "/v1/completions",
                        &json!({"prompt": format!("Count to {i}:"), "max_tokens": 30, "temperature": 1.0, "ignore_eos": true}),
                    )
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(server.complete("/v1/completions", &body), first, "same text while other requests run");
        for handle in load {
            handle.join().unwrap();
        }
    });
}

#[test]
fn chat_logprobs_have_the_openai_shape() {
    let answer = server().post_ok(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 3,
                "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["token"], "The");
    assert_eq!(content[0]["bytes"], json!([84, 104, 101]));
    // The reference's first-position log-prob of "The" is -1.8827.
    assert!((content[0]["logprob"].as_f64().unwrap() + 1.8827).abs() < 1e-3, "{}", content[0]);
    let top = content[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top[1]["token"], "L");
}

#[test]
fn tokenize_detokenize_and_models() {
    let server = server();
    let reference = reference();
    let case = &reference["tokenize"][0];
    let answer = server.post_ok("/tokenize", &json!({"prompt": case["text"]}));
    assert_eq!(ids(&answer["tokens"]), ids(&case["ids"]));
    assert_eq!(answer["count"], case["ids"].as_array().unwrap().len());
    assert_eq!(answer["max_model_len"], 1024);
    let answer = server.post_ok("/detokenize", &json!({"tokens": case["ids"]}));
    assert_eq!(answer["prompt"], case["text"]);

    let chat = greedy_prompts().into_iter().find(|p| p["kind"] == "chat").unwrap();
    let answer = server.post_ok("/tokenize", &json!({"messages": chat["messages"]}));
    assert_eq!(ids(&answer["tokens"]), ids(&chat["prompt_ids"]), "chat template with the generation prompt");

    let reply = server.post("/detokenize", &json!({"tokens": [1, 999999]}));
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["param"], "tokens");

    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(models["data"][0]["max_model_len"], 1024);
}

/// Metric names registered in `host/src/metrics.rs`, read from its source.
fn metric_names_in_source() -> Vec<String> {
    let source = std::fs::read_to_string(pagedserve_tests::repo_root().join("host/src/metrics.rs")).unwrap();
    let mut names = Vec::new();
    for opener in ["gauge(", "counter(", "histogram(", "Gauge::new(", "Opts::new("] {
        for (at, _) in source.match_indices(opener) {
            let rest = source[at + opener.len()..].trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                names.push(format!("pagedserve_{}", &rest[..rest.find('"').unwrap()]));
            }
        }
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "found too few metric names: {names:?}");
    names
}

#[test]
fn metrics_parse_and_list_every_registered_metric() {
    let server = server();
    server.complete("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    let reply = server.get("/metrics");
    assert_eq!(reply.status, 200);
    assert!(reply.content_type.starts_with("text/plain; version=0.0.4"), "{}", reply.content_type);
    let scrape = server.scrape();
    // Per-plugin series are labelled by plugin kind and name: they exist once a plugin is loaded
    // (checked by the plugin tests), not on this server, which runs none.
    for name in metric_names_in_source().into_iter().filter(|n| !n.starts_with("pagedserve_plugin_")) {
        assert!(scrape.docs.contains_key(&name), "{name} missing from /metrics:\n{}", reply.body);
    }
    assert!(server.metric("pagedserve_generation_tokens_total") >= 2.0);
    assert!(scrape.samples.iter().all(|s| s.labels.get("model_name") == Some("SmolLM2-135M-Instruct.Q4_1")));
}

fn assert_error(reply: pagedserve_tests::Reply, status: u16, param: Option<&str>, words: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], status);
    assert!(error["type"].is_string());
    assert_eq!(error["param"].as_str(), param, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(words), "{message:?} should mention {words:?}");
}

#[test]
fn errors_follow_the_openai_shape_and_status_codes() {
    let server = server();
    assert_eq!(server.get("/health").status, 200);
    assert_error(server.post_raw("/v1/completions", "{\"prompt\": "), 400, None, "JSON");
    assert_error(server.post("/v1/completions", &json!({"prompt": "hi", "top_p": 1.5})), 400, Some("top_p"), "top_p");
    assert_error(
        server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})),
        400,
        Some("temperature"),
        "temperature",
    );
    assert_error(server.post("/v1/completions", &json!({"prompt": ""})), 400, Some("prompt"), "empty");
    let long_prompt = "hello ".repeat(1100);
    assert_error(server.post("/v1/completions", &json!({"prompt": long_prompt})), 400, Some("prompt"), "maximum context length is 1024");
    assert_error(
        server.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1024})),
        400,
        Some("max_tokens"),
        "maximum context length is 1024",
    );
    assert_error(server.post("/v1/completions", &json!({"prompt": [5, 70000]})), 400, Some("prompt"), "70000");
    assert_error(server.post("/v1/completions", &json!({"prompt": "hi", "n": 0})), 400, Some("n"), "1..=16");
    assert_error(server.post("/v1/completions", &json!({"prompt": "hi", "stop": vec!["a"; 9]})), 400, Some("stop"), "8");
    assert_error(server.post("/v1/completions", &json!({"prompt": "hi", "logprobs": 6})), 400, Some("logprobs"), "0..=5");
    assert_error(
        server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": true})),
        400,
        Some("top_logprobs"),
        "0..=20",
    );
    assert_error(
        server.post("/v1/completions", &json!({"prompt": "hi", "sampler": "mirostat"})),
        400,
        Some("sampler"),
        "no sampler plugin named mirostat is loaded",
    );
    assert_error(server.post("/v1/completions", &json!({"prompt": "hi", "model": "gpt-4"})), 404, Some("model"), "gpt-4");
    // Unknown fields are ignored; `null`s are defaults.
    let answer = server.post_ok("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1, "frobnicate": 1, "stop": null, "seed": null}));
    assert_eq!(answer["usage"]["completion_tokens"], 1);
}

#[test]
fn a_body_over_the_limit_is_413() {
    use std::io::{Read, Write};
    let server = server();
    // Declares 5 MiB (over the 4 MiB default) and sends the start of it.
    let address = server.base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let length = 5 << 20;
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let _ = socket.write_all(&vec![b' '; 64 << 10]);
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n @ 1..) = socket.read(&mut buffer) {
        response.extend_from_slice(&buffer[..n]);
        if response.ends_with(b"}") {
            break;
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("--max-request-body"), "{response}");
}

#[test]
fn completion_logprobs_keep_every_byte_token_apart() {
    // Pieces of multi-byte characters all decode to U+FFFD: spelled `bytes:\xNN` they stay
    // distinct, so each step lists its top tokens and its own token with its own log-prob.
    let body = json!({"prompt": "Emoji list: 🌍", "max_tokens": 6, "temperature": 1.5, "seed": 3, "logprobs": 3});
    let answer = server().post_ok("/v1/completions", &body);
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6, "{answer}");
    for (i, token) in tokens.iter().enumerate() {
        let top = logprobs["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() >= 3, "step {i}: {top:?}");
        let own = top.get(token.as_str().unwrap()).unwrap_or_else(|| panic!("step {i}: {token} not in {top:?}"));
        assert_eq!(own, &logprobs["token_logprobs"][i], "step {i}");
    }
}

#[test]
fn fields_that_would_be_ignored_and_unknown_routes_get_clear_errors() {
    let server = server();
    let refused = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": true}}));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "stream_options");
    let refused = server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "echo": true}));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "echo");
    let refused = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2, "spaces_between_special_tokens": true}));
    assert_eq!(refused.json()["error"]["param"], "spaces_between_special_tokens", "{}", refused.body);
    let accepted = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2, "spaces_between_special_tokens": false}));
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    let missing = server.get("/v1/nothing");
    assert_eq!((missing.status, missing.json()["error"]["code"].clone()), (404, json!(404)), "{}", missing.body);
    let wrong_method = server.get("/v1/completions");
    assert_eq!((wrong_method.status, wrong_method.json()["error"]["code"].clone()), (405, json!(405)), "{}", wrong_method.body);
}

#[test]
fn tokenize_counts_the_tools_a_chat_request_would_send() {
    let server = server();
    let messages = json!([{"role": "user", "content": "What's the weather in Paris?"}]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let plain = server.post_ok("/tokenize", &json!({"messages": messages}))["count"].as_u64().unwrap();
    let with_tools = server.post_ok("/tokenize", &json!({"messages": messages, "tools": tools}))["count"].as_u64().unwrap();
    let chat = server.post_ok("/v1/chat/completions", &json!({"messages": messages, "tools": tools, "max_tokens": 1, "temperature": 0}));
    assert!(with_tools > plain, "{with_tools} vs {plain}");
    assert_eq!(chat["usage"]["prompt_tokens"].as_u64(), Some(with_tools), "{chat}");
    let refused = server.post("/tokenize", &json!({"messages": messages, "tools": "weather"}));
    assert_eq!((refused.status, refused.json()["error"]["param"].clone()), (400, json!("tools")), "{}", refused.body);
}
