//! Plugins on the real server: request filters (`api-keys`, `rate-limit`) on the HTTP path, a
//! sampler plugin (`mirostat`) named by a request, and the admin API: refusals that leave the active
//! plugin as it was, a scheduler uploaded over HTTP, and scheduler swaps while streaming requests
//! run, with every output identical to its run alone; constraint plugins named by requests.

use pagedserve_tests::{plugin_bytes as bytes, plugin_entry as entry, plugins_config_file as config_file, sha256, stream_text, Server};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token";

/// `Server::start` with `args` and generous plugin deadlines. These tests are about what the
/// plugins do, not about their deadlines (`host/tests/plugins.rs` tests those): on a loaded
/// 2-core test machine a 20 ms call can overrun, which is a correctly handled fault (503 for a
/// filter, FCFS for a scheduler) but not what a test here expects.
fn start(args: &[&str]) -> Server {
    let deadlines = [
        "--plugin-scheduler-deadline-ms", "2000", "--plugin-sampler-deadline-ms", "2000",
        "--plugin-filter-deadline-ms", "2000", "--plugin-constraint-deadline-ms", "2000",
    ];
    Server::start(&[args, &deadlines[..]].concat())
}

/// The sum of a metric's series whose label `name` is `plugin`.
fn plugin_metric(server: &Server, metric: &str, plugin: &str) -> f64 {
    labelled_metric(server, metric, "name", plugin)
}

/// The sum of `metric`'s samples whose `label` is `value`.
fn labelled_metric(server: &Server, metric: &str, label: &str, value: &str) -> f64 {
    server
        .scrape()
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.get(label) == Some(value))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// A PUT declaring `length` bytes that sends only the first 16 KiB; returns the raw response.
fn raw_upload(server: &Server, path: &str, length: usize, hash: &str) -> String {
    use std::io::{Read, Write};
    let url = server.admin_url(path);
    let address = url.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(
        socket,
        "PUT {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\nx-sha256: {hash}\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let _ = socket.write_all(&vec![0u8; 16 << 10]);
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n @ 1..) = socket.read(&mut buffer) {
        response.extend_from_slice(&buffer[..n]);
        if response.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn api_keys_and_rate_limit_filters_answer_401_and_429() {
    let config = json!({"filters": [
        entry("api-keys", json!({"keys": {"sk-acme": {"tenant": "acme"}, "sk-beta": {"tenant": "beta"}}})),
        entry("rate-limit", json!({"capacity": 3, "refill_per_second": 0.001})),
    ]});
    let path = config_file("filters", &config);
    let server = start(&["--plugins-config", &path]);
    let request = json!({"prompt": "Hello", "max_tokens": 3});

    let missing = server.post("/v1/completions", &request);
    assert_eq!(missing.status, 401, "{}", missing.body);
    let unknown = server.post_with("/v1/completions", &request, &[("authorization", "Bearer sk-nobody")]);
    assert_eq!(unknown.status, 401, "{}", unknown.body);
    let error = &unknown.json()["error"];
    assert!(error["message"].as_str().unwrap().contains("api-keys"), "names the plugin: {error}");
    assert_eq!(error["code"], 401);

    // A known key passes, three times (the bucket), then 429; another tenant still passes.
    for i in 0..3 {
        let ok = server.post_with("/v1/completions", &request, &[("authorization", "Bearer sk-acme")]);
        assert_eq!(ok.status, 200, "request {i}: {}", ok.body);
        assert_eq!(ok.json()["usage"]["completion_tokens"], 3);
    }
    let limited = server.post_with("/v1/completions", &request, &[("authorization", "Bearer sk-acme")]);
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.json()["error"]["message"].as_str().unwrap().contains("rate-limit"), "{}", limited.body);
    let other = server.post_with("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        &[("x-api-key", "sk-beta")]);
    assert_eq!(other.status, 200, "{}", other.body);
}

#[test]
fn a_sampler_plugin_named_in_a_request_produces_tokens() {
    let path = config_file("sampler", &json!({"samplers": [entry("mirostat", Value::Null)]}));
    let server = start(&["--plugins-config", &path]);
    let answer = server.post_ok(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": true, "sampler": "mirostat", "seed": 7}),
    );
    assert_eq!(answer["usage"]["completion_tokens"], 12, "{answer}");
    assert!(!answer["choices"][0]["text"].as_str().unwrap().is_empty(), "{answer}");
    assert!(plugin_metric(&server, "pagedserve_plugin_calls_total", "mirostat") >= 12.0);
    // With a plugin loaded, every plugin metric family is on /metrics (faults and rollbacks at 0).
    let scrape = server.scrape();
    for name in ["calls_total", "call_duration_seconds", "faults_total", "swaps_total", "rollbacks_total", "active_info"] {
        assert!(scrape.docs.contains_key(&format!("pagedserve_plugin_{name}")), "pagedserve_plugin_{name} missing");
    }
    assert_eq!(plugin_metric(&server, "pagedserve_plugin_faults_total", "mirostat"), 0.0);

    let unknown = server.post("/v1/completions", &json!({"prompt": "a", "sampler": "typical"}));
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert_eq!(unknown.json()["error"]["param"], "sampler");
    assert_eq!(unknown.json()["error"]["message"], "no sampler plugin named typical is loaded");
}

#[test]
fn constraint_plugins_named_in_requests_hold_every_output() {
    let path = config_file(
        "constraints",
        &json!({"constraints": [entry("no-digits", Value::Null), entry("regex", Value::Null), entry("word-limit", Value::Null)]}),
    );
    let server = start(&["--plugins-config", &path]);
    let ask = |text: &str| json!([{"role": "user", "content": text}]);

    // No digits, in chat, streamed and not, where the model wants to write numbers.
    let body = json!({"messages": ask("List the numbers from 1 to 10."), "max_tokens": 30, "temperature": 0,
                      "constraint": "no-digits"});
    let whole = server.post_ok("/v1/chat/completions", &body);
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty() && !text.chars().any(|c| c.is_ascii_digit()), "{text:?}");
    let (streamed, _) = stream_text(&server.stream("/v1/chat/completions", &body), 0);
    assert_eq!(streamed, text, "streamed and whole agree");

    // A regex over the text, n = 3 sampled: every choice matches it whole and ends there.
    let answer = server.post_ok("/v1/completions", &json!({"prompt": "The year the war ended was", "max_tokens": 12,
        "temperature": 1.0, "n": 3, "seed": 4, "constraint": {"name": "regex", "config": {"pattern": " (19|20)[0-9]{2}\\."}}}));
    let year = regex::Regex::new(r"^ (19|20)[0-9]{2}\.$").unwrap();
    for choice in answer["choices"].as_array().unwrap() {
        let text = choice["text"].as_str().unwrap();
        assert!(year.is_match(text), "{text:?}");
        assert_eq!(choice["finish_reason"], "stop", "{choice}");
    }

    // At most five words, then the end.
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": ask("Tell me a long story about a dragon."),
        "max_tokens": 60, "temperature": 0, "constraint": {"name": "word-limit", "config": {"words": 5}}}));
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.split_whitespace().count() <= 5 && !text.trim().is_empty(), "{text:?}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert!(plugin_metric(&server, "pagedserve_plugin_calls_total", "word-limit") >= 1.0);

    // An unknown plugin, a bad configuration, two constraints at once.
    let unknown = server.post("/v1/completions", &json!({"prompt": "a", "constraint": "typos"}));
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert_eq!(unknown.json()["error"]["param"], "constraint");
    assert_eq!(unknown.json()["error"]["message"], "no constraint plugin named typos is loaded");
    let both = server.post("/v1/completions", &json!({"prompt": "a", "constraint": "no-digits", "guided_regex": "a+"}));
    assert_eq!((both.status, both.json()["error"]["param"].clone()), (400, json!("constraint")), "{}", both.body);
    let refused = server.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 4,
        "constraint": {"name": "regex", "config": {"pattern": "(("}}}));
    assert_eq!(refused.status, 400, "a configuration the plugin refuses is the client's error: {}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "constraint");
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("constraint plugin `regex`"), "{}", refused.body);
    assert_eq!(server.metric("pagedserve_kv_cache_usage_perc"), 0.0, "nothing held after the refusal");
}

#[test]
fn the_admin_api_refuses_bad_uploads_and_swaps_the_scheduler() {
    let path = config_file("admin", &json!({"scheduler": entry("fcfs", Value::Null)}));
    let server = start(&[
        "--plugins-config", &path, "--admin-port", "0", "--admin-token", TOKEN,
        "--plugin-max-component-bytes", "200000",
    ]);
    let list = |token| server.admin("GET", "/admin/plugins", token, &[], &[]);
    let before = list(Some(TOKEN));
    assert_eq!(before.status, 200, "{}", before.body);
    let fcfs = &before.json()["plugins"][0];
    assert_eq!(fcfs["name"], "fcfs");
    assert_eq!(fcfs["in_use"], true);
    assert_eq!(fcfs["versions"][0]["sha256"], sha256(&bytes("fcfs")));

    let priority = bytes("priority");
    let hash = sha256(&priority);
    let put = |token, body: &[u8], hash: &str| {
        server.admin("PUT", "/admin/plugins/scheduler/priority", token, body, &[("x-sha256", hash)])
    };
    // Wrong or missing token.
    assert_eq!(list(Some("wrong")).status, 401);
    assert_eq!(list(None).status, 401);
    assert_eq!(put(Some("wrong"), &priority, &hash).status, 401);
    // Wrong hash.
    let wrong_hash = put(Some(TOKEN), &priority, &sha256(b"something else"));
    assert_eq!(wrong_hash.status, 400, "{}", wrong_hash.body);
    assert!(wrong_hash.json()["error"]["message"].as_str().unwrap().contains("sha256 mismatch"));
    // A component of the wrong world (a sampler uploaded as a scheduler).
    let sampler = bytes("mirostat");
    let wrong_world = put(Some(TOKEN), &sampler, &sha256(&sampler));
    assert_eq!(wrong_world.status, 422, "{}", wrong_world.body);
    assert!(wrong_world.json()["error"]["message"].as_str().unwrap().contains("not a `scheduler` plugin"), "{}", wrong_world.body);
    // Over --plugin-max-component-bytes: refused from the declared length, before the body is
    // read (so over a raw socket: an HTTP client sending the whole body sees the connection close).
    let oversized = raw_upload(&server, "/admin/plugins/scheduler/priority", 300_000, &hash);
    assert!(oversized.starts_with("HTTP/1.1 413"), "{oversized}");
    assert!(oversized.contains("the limit is 200000"), "{oversized}");
    // Nothing changed.
    assert_eq!(list(Some(TOKEN)).json(), before.json(), "refused uploads must leave the plugins as they were");
    assert_eq!(plugin_metric(&server, "pagedserve_plugin_swaps_total", "priority"), 0.0);

    // The real thing: priority becomes the engine's policy, and the swap is counted.
    let ok = put(Some(TOKEN), &priority, &hash);
    assert_eq!(ok.status, 201, "{}", ok.body);
    let after = list(Some(TOKEN)).json();
    let entry = after["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "priority").expect("priority listed").clone();
    assert_eq!(entry["in_use"], true, "{after}");
    assert_eq!(entry["versions"][0]["sha256"], hash);
    assert!(plugin_metric(&server, "pagedserve_plugin_swaps_total", "priority") >= 1.0);
    // Serving goes on under it.
    let text = server.complete("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}));
    assert!(!text.is_empty());
    assert!(plugin_metric(&server, "pagedserve_plugin_calls_total", "priority") >= 1.0);

    // Rollback of a plugin with one version leaves it inactive (native FCFS ranks); remove works.
    let rolled = server.admin("POST", "/admin/plugins/scheduler/priority/rollback", Some(TOKEN), &[], &[]);
    assert_eq!(rolled.status, 200, "{}", rolled.body);
    let removed = server.admin("DELETE", "/admin/plugins/scheduler/priority", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "{}", removed.body);
    let missing = server.admin("DELETE", "/admin/plugins/scheduler/priority", Some(TOKEN), &[], &[]);
    assert_eq!(missing.status, 404, "{}", missing.body);
}

#[test]
fn swapping_the_scheduler_while_streaming_keeps_every_output_identical() {
    let path = config_file("swap", &json!({"scheduler": entry("fcfs", Value::Null)}));
    let server = start(&[
        "--plugins-config", &path, "--admin-port", "0", "--admin-token", TOKEN, "--max-model-len", "512",
    ]);
    // 64 streaming requests, as many as the running batch holds.
    let requests: Vec<Value> = (0..64)
        .map(|i| {
            json!({"prompt": format!("Story {i}: the {} of the old lighthouse keeper was", ["dog", "cat", "boat", "lamp"][i % 4]),
                   "max_tokens": 12 + i % 5, "temperature": 0, "ignore_eos": true, "priority": (i % 3) as i32})
        })
        .collect();
    let run = |r: &Value| {
        let chunks = server.stream("/v1/completions", r);
        let (text, finish) = stream_text(&chunks, 0);
        assert_eq!(finish.as_deref(), Some("length"));
        text
    };
    let alone: Vec<String> = requests.iter().map(run).collect();

    let (fcfs, priority) = (bytes("fcfs"), bytes("priority"));
    let done = std::sync::atomic::AtomicBool::new(false);
    let (together, swaps) = std::thread::scope(|scope| {
        let swapper = scope.spawn(|| {
            // Counts only the swaps made while requests were in flight.
            let (mut swaps, mut total) = (0, 0);
            while total < 4 || !done.load(std::sync::atomic::Ordering::SeqCst) {
                let during = !done.load(std::sync::atomic::Ordering::SeqCst);
                let (name, body) = if total % 2 == 0 { ("priority", &priority) } else { ("fcfs", &fcfs) };
                let reply = server.admin("PUT", &format!("/admin/plugins/scheduler/{name}"), Some(TOKEN), body, &[("x-sha256", &sha256(body))]);
                assert_eq!(reply.status, 201, "{}", reply.body);
                swaps += usize::from(during);
                total += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            swaps
        });
        let handles: Vec<_> = requests.iter().map(|r| scope.spawn(move || run(r))).collect();
        let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (together, swapper.join().unwrap())
    });
    assert!(swaps >= 3, "only {swaps} swaps while the requests ran");
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "request {i} differs when the scheduler is swapped under it");
    }
    assert!(plugin_metric(&server, "pagedserve_plugin_swaps_total", "priority") >= 2.0);
    assert_eq!(server.metric("pagedserve_plugin_faults_total"), 0.0, "{}", server.log());
}

#[test]
fn filters_uploaded_over_the_admin_api_clamp_refuse_and_stop_outputs() {
    let server = start(&["--admin-port", "0", "--admin-token", TOKEN]);
    let request = json!({"prompt": "The capital of France is Paris. The capital of Italy is", "max_tokens": 24,
                         "temperature": 0, "ignore_eos": true});
    let full = server.complete("/v1/completions", &request);
    // A word from the middle of the greedy output.
    let prompt = request["prompt"].as_str().unwrap().to_lowercase();
    let words: Vec<&str> = full
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3 && !prompt.contains(&w.to_lowercase()))
        .collect();
    assert!(words.len() >= 2, "{full:?}");
    let word = words[words.len() / 2];
    let at = full.find(word).unwrap();

    let upload = |name: &str, config: &Value| {
        let body = bytes(name);
        let reply = server.admin("PUT", &format!("/admin/plugins/filter/{name}"), Some(TOKEN), &body,
            &[("x-sha256", &sha256(&body)), ("x-plugin-config", &config.to_string())]);
        assert_eq!(reply.status, 201, "{}", reply.body);
    };
    // Modify: max-tokens clamps, and the request is validated again with the new value.
    upload("max-tokens", &json!({"max_tokens": 5}));
    let clamped = server.post_ok("/v1/completions", &request);
    assert_eq!(clamped["usage"]["completion_tokens"], 5, "{clamped}");
    assert_eq!(clamped["choices"][0]["text"].as_str().unwrap(), &full[..clamped["choices"][0]["text"].as_str().unwrap().len()]);
    let removed = server.admin("DELETE", "/admin/plugins/filter/max-tokens", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "{}", removed.body);

    // Reject on the prompt, stop on the output.
    upload("blocklist", &json!({"words": [word]}));
    let refused = server.post("/v1/completions", &json!({"prompt": format!("Say {word} now"), "max_tokens": 2}));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("blocklist"), "{}", refused.body);
    let chunks = server.stream("/v1/completions", &request);
    let (text, finish) = stream_text(&chunks, 0);
    assert_eq!(finish.as_deref(), Some("stop"), "{chunks:?}");
    // The delta that completed the word is withheld: the client sees the text up to it.
    assert!(full.starts_with(&text), "{text:?} vs {full:?}");
    assert!(!text.contains(word) && text.len() < at + word.len(), "stopped at {word:?}: {text:?} of {full:?}");
    assert!(text.len() >= at.saturating_sub(16), "stopped too early: {text:?} of {full:?}");
    // Non-streaming too.
    let answer = server.post_ok("/v1/completions", &request);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert_eq!(answer["choices"][0]["text"].as_str().unwrap(), text);
    // The engine counts both as stopped, not as aborted by a client.
    let finished = |reason: &str| labelled_metric(&server, "pagedserve_request_success_total", "finished_reason", reason);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while finished("stop") < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!((finished("stop"), finished("abort")), (2.0, 0.0));
}

#[test]
fn removing_a_plugin_touches_only_its_kind_and_never_one_in_use() {
    let server = start(&["--admin-port", "0", "--admin-token", TOKEN, "--scheduling-policy", "priority"]);
    let upload = |kind: &str, name: &str, component: &str, config: &Value| {
        let body = bytes(component);
        let (hash, config) = (sha256(&body), config.to_string());
        let mut headers = vec![("x-sha256", hash.as_str())];
        if config != "null" {
            headers.push(("x-plugin-config", config.as_str()));
        }
        let reply = server.admin("PUT", &format!("/admin/plugins/{kind}/{name}"), Some(TOKEN), &body, &headers);
        assert_eq!(reply.status, 201, "{}", reply.body);
    };
    let clamped = |server: &Server| {
        server.post_ok("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 20, "ignore_eos": true, "temperature": 0}))["usage"]["completion_tokens"].clone()
    };
    // A filter and a sampler of the same name: removing the sampler leaves the filter running.
    upload("filter", "guard", "max-tokens", &json!({"max_tokens": 3}));
    upload("sampler", "guard", "mirostat", &Value::Null);
    assert_eq!(clamped(&server), 3);
    let removed = server.admin("DELETE", "/admin/plugins/sampler/guard", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(clamped(&server), 3, "the filter `guard` must still run");
    assert_eq!(server.admin("GET", "/admin/plugins", Some(TOKEN), &[], &[]).json()["filters"], json!(["guard"]));

    let removed = server.admin("DELETE", "/admin/plugins/filter/guard", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "{}", removed.body);

    // A sampler that a request in flight uses is not removed from under it.
    upload("sampler", "slow", "mirostat", &Value::Null);
    let request = json!({"prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": true, "sampler": "slow", "seed": 1, "stream": true});
    std::thread::scope(|scope| {
        let streaming = scope.spawn(|| server.stream("/v1/completions", &request));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while server.metric("pagedserve_num_requests_running") < 1.0 {
            assert!(std::time::Instant::now() < deadline, "the request never started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let refused = server.admin("DELETE", "/admin/plugins/sampler/slow", Some(TOKEN), &[], &[]);
        assert_eq!(refused.status, 409, "{}", refused.body);
        assert!(refused.json()["error"]["message"].as_str().unwrap().contains("in use"), "{}", refused.body);
        let chunks = streaming.join().unwrap();
        let (_, finish) = stream_text(&chunks, 0);
        assert_eq!(finish.as_deref(), Some("length"), "the request ran to its end: {chunks:?}");
    });
    let removed = server.admin("DELETE", "/admin/plugins/sampler/slow", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "once its request ended: {}", removed.body);

    // A scheduler removed gives way to the policy the server was started with, not to FCFS.
    // (`/ui/state` reuses one engine snapshot for 250 ms: polled until it shows the policy.)
    let policy_becomes = |expected: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let policy = server.get("/ui/state").json()["engine"]["policy"].clone();
            if policy == expected {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the policy is {policy}, not {expected}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    upload("scheduler", "fcfs", "fcfs", &Value::Null);
    policy_becomes("wasm:fcfs");
    let removed = server.admin("DELETE", "/admin/plugins/scheduler/fcfs", Some(TOKEN), &[], &[]);
    assert_eq!(removed.status, 200, "{}", removed.body);
    policy_becomes("priority");
    server.complete("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));

    // Admin errors are JSON, unknown routes and methods included.
    for (method, path, status) in [
        ("POST", "/admin/plugins/scheduler/fcfs/activate", 400),
        ("GET", "/admin/nothing", 404),
        ("GET", "/admin/plugins/scheduler/fcfs/rollback", 405),
    ] {
        let reply = server.admin(method, path, Some(TOKEN), &[], &[]);
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        assert_eq!(reply.json()["error"]["code"], status, "{method} {path}: {}", reply.body);
    }
}
