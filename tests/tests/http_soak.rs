//! The soak: the real server under a bounded run of mixed load, for `PAGEDSERVE_SOAK_SECS`
//! seconds (60 by default; the README gives the long command). At once:
//! - streaming and non-streaming clients, completions and chat, greedy and seeded, each checked
//!   against its answer on the idle server;
//! - clients that hang up at a random point of their stream, or before their answer;
//! - a scheduler plugin swap over the admin API every few seconds;
//! - malformed, oversized and out-of-range requests, each answered with its 4xx.
//!
//! At the end: every completed request equals its idle answer exactly (the CPU path is
//! deterministic), the KV pool is back to its baseline with nothing running or waiting, the
//! server's resident memory is stable (its slope over the run after warm-up is reported and
//! bounded), no plugin fault, no panic, and `/health` is 200.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pagedserve_tests::{plugin_bytes, plugin_entry, plugins_config_file, sha256, stream_text, Server};
use serde_json::{json, Value};

const TOKEN: &str = "soak-admin-token";
const MAX_REQUEST_BODY: usize = 256 << 10;

/// A tiny deterministic generator (xorshift), so a failing run can be repeated from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The checked workload: (path, body) pairs whose answers are compared with their idle runs.
fn workload() -> Vec<(&'static str, Value)> {
    let topics = ["the sea", "a lighthouse", "bread", "the moon", "trains", "winter"];
    topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            // Greedy or seeded sampling, alternately; completions and chat, alternately in pairs.
            let sampling = if i % 2 == 0 { json!({"temperature": 0}) } else { json!({"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}) };
            let mut body = if i / 2 % 2 == 0 {
                json!({"prompt": format!("A short note about {topic}:"), "max_tokens": 16 + 4 * i, "ignore_eos": true})
            } else {
                json!({"messages": [{"role": "user", "content": format!("Say something about {topic}.")}], "max_tokens": 16 + 4 * i, "ignore_eos": true})
            };
            for (k, v) in sampling.as_object().unwrap() {
                body[k] = v.clone();
            }
            (if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" }, body)
        })
        .collect()
}

/// The text of a request's only choice, streamed or not.
fn answer(server: &Server, path: &str, body: &Value, stream: bool) -> String {
    if stream {
        let chunks = server.stream(path, body);
        let (text, finish) = stream_text(&chunks, 0);
        assert_eq!(finish.as_deref(), Some("length"), "{body}");
        text
    } else {
        server.complete(path, body)
    }
}

/// Requests the server must refuse, with the statuses each may get.
fn bad_requests() -> Vec<(&'static str, Vec<u8>, &'static str, &'static [u16])> {
    let json_type = "application/json";
    vec![
        ("/v1/completions", br#"{"prompt": "unterminated"#.to_vec(), json_type, &[400]),
        ("/v1/completions", br#"{"prompt": "hi", "max_tokens": 18446744073709551615}"#.to_vec(), json_type, &[400]),
        ("/v1/completions", br#"{"prompt": [99999999], "max_tokens": 2}"#.to_vec(), json_type, &[400]),
        ("/v1/completions", br#"{"prompt": "hi", "n": 0}"#.to_vec(), json_type, &[400]),
        ("/v1/completions", br#"{"prompt": "hi", "logprobs": 1000}"#.to_vec(), json_type, &[400]),
        ("/v1/completions", br#"{"prompt": "hi"}"#.to_vec(), "text/plain", &[415]),
        ("/v1/chat/completions", br#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.to_vec(), json_type, &[400]),
        ("/v1/chat/completions", br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#.to_vec(), json_type, &[400]),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}"#.to_vec(),
            json_type,
            &[400],
        ),
        ("/v1/completions", format!(r#"{{"prompt": "{}"}}"#, "a".repeat(MAX_REQUEST_BODY + 1)).into_bytes(), json_type, &[413]),
    ]
}

/// Sends `body` as it is on a fresh connection; the status line's code.
fn send_raw(server: &Server, path: &str, body: &[u8], content_type: &str) -> u16 {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.address(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let response = server.raw(&request);
    response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status line: {response:?}"))
}

/// Resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// Least-squares slope of `samples` (seconds, MiB), in MiB per minute.
fn slope_per_minute(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    let (mean_t, mean_m) = (samples.iter().map(|s| s.0).sum::<f64>() / n, samples.iter().map(|s| s.1).sum::<f64>() / n);
    let cov: f64 = samples.iter().map(|(t, m)| (t - mean_t) * (m - mean_m)).sum();
    let var: f64 = samples.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    60.0 * cov / var
}

#[test]
fn the_server_holds_up_under_mixed_load_swaps_disconnects_and_bad_requests() {
    let seconds: u64 = std::env::var("PAGEDSERVE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("PAGEDSERVE_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let config = plugins_config_file("soak", &json!({"scheduler": plugin_entry("fcfs", Value::Null)}));
    let body_limit = MAX_REQUEST_BODY.to_string();
    let server = Server::start(&[
        "--plugins-config", &config, "--admin-port", "0", "--admin-token", TOKEN, "--max-model-len", "512",
        "--max-request-body", &body_limit,
        // A small pool: every block is in use (and its pages resident) within the warm-up, so
        // resident memory after it measures leaks, not a large pool being touched for the first
        // time; it also makes the scheduler preempt.
        "--num-kv-blocks", "160",
        // A generous scheduler deadline: on a loaded 2-core machine a call can overrun, which would
        // be a (handled) fault; the soak counts faults and wants none.
        "--plugin-scheduler-deadline-ms", "2000",
    ]);
    let pid = server.pid();
    let work = workload();
    let idle: Vec<String> = work.iter().map(|(path, body)| answer(&server, path, body, false)).collect();
    let baseline_kv = server.metric("pagedserve_kv_cache_usage_perc");

    let stop = AtomicBool::new(false);
    let (checked, hung_up, refused, swaps) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let started = Instant::now();
    let mut rss = Vec::new();
    std::thread::scope(|scope| {
        // Checked clients.
        for client in 0..4u64 {
            let (server, work, idle, stop, checked) = (&server, &work, &idle, &stop, &checked);
            scope.spawn(move || {
                let mut rng = Rng(seed ^ (client + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                while !stop.load(Ordering::SeqCst) {
                    let i = rng.below(work.len());
                    let (path, body) = &work[i];
                    let text = answer(server, path, body, rng.below(3) != 0);
                    assert_eq!(text, idle[i], "request {i} ({body}) differs under load (seed {seed})");
                    checked.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Clients that hang up: mid-stream after a few chunks, or before a non-streamed answer.
        {
            let (server, stop, hung_up) = (&server, &stop, &hung_up);
            scope.spawn(move || {
                let mut rng = Rng(seed ^ 0xD15C);
                while !stop.load(Ordering::SeqCst) {
                    let stream = rng.below(2) == 0;
                    let body = json!({"prompt": "Tell me a long story about a cat.", "max_tokens": 300, "ignore_eos": true, "stream": stream});
                    let socket = server.open_post("/v1/completions", &body);
                    if stream {
                        let mut reader = BufReader::new(socket);
                        let (mut line, mut chunks, wanted) = (String::new(), 0, rng.below(12));
                        while chunks < wanted {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                break;
                            }
                            chunks += usize::from(line.starts_with("data: {"));
                        }
                    } else {
                        std::thread::sleep(Duration::from_millis(50 + rng.below(400) as u64));
                        drop(socket);
                    }
                    hung_up.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Requests that must be refused.
        {
            let (server, stop, refused) = (&server, &stop, &refused);
            scope.spawn(move || {
                let bad = bad_requests();
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    let (path, body, content_type, statuses) = &bad[k % bad.len()];
                    let status = send_raw(server, path, body, content_type);
                    assert!(statuses.contains(&status), "{path} {}: {status}, expected {statuses:?}", String::from_utf8_lossy(&body[..body.len().min(200)]));
                    refused.fetch_add(1, Ordering::SeqCst);
                    k += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        // The operator: a scheduler swap every 3 s.
        {
            let (server, stop, swaps) = (&server, &stop, &swaps);
            scope.spawn(move || {
                let (fcfs, priority) = (plugin_bytes("fcfs"), plugin_bytes("priority"));
                let mut next_swap = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    if Instant::now() >= next_swap {
                        let k = swaps.load(Ordering::SeqCst);
                        let (name, body) = if k % 2 == 0 { ("priority", &priority) } else { ("fcfs", &fcfs) };
                        let reply = server.admin("PUT", &format!("/admin/plugins/scheduler/{name}"), Some(TOKEN), body, &[("x-sha256", &sha256(body))]);
                        assert_eq!(reply.status, 201, "{}", reply.body);
                        swaps.fetch_add(1, Ordering::SeqCst);
                        next_swap += Duration::from_secs(3);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        // This thread: resident memory twice a second until the time is up.
        while started.elapsed() < Duration::from_secs(seconds) {
            rss.push((started.elapsed().as_secs_f64(), rss_mib(pid)));
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::SeqCst);
    });

    // Everything has finished or hung up: the pool must be as it was, nothing left queued.
    server.wait_for_kv_usage(baseline_kv, Duration::from_secs(20));
    assert_eq!(server.metric("pagedserve_num_requests_running"), 0.0);
    assert_eq!(server.metric("pagedserve_num_requests_waiting"), 0.0);
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.metric("pagedserve_plugin_faults_total"), 0.0, "{}", server.log());
    assert!(!server.log().contains("panicked"), "{}", server.log());

    // Memory after warm-up (allocator arenas, compiled plugins, caches): the first quarter of the
    // run, and at least its first 30 s up to half of it. On a 2-core CI machine the resident size
    // was seen still climbing to its plateau (704 -> 738 MiB) 10 s in, then flat (737 -> 739 MiB
    // from 22 s to 90 s).
    let warm_up = (seconds as f64 / 4.0).max((seconds as f64 / 2.0).min(30.0));
    let warm: Vec<(f64, f64)> = rss.iter().copied().filter(|(t, _)| *t >= warm_up).collect();
    let slope = slope_per_minute(&warm);
    let (first, last) = (warm.first().unwrap().1, warm.last().unwrap().1);
    let peak = rss.iter().map(|s| s.1).fold(0.0, f64::max);
    let (checked, hung_up, refused, swaps) = (checked.into_inner(), hung_up.into_inner(), refused.into_inner(), swaps.into_inner());
    println!(
        "soak: {seconds} s (seed {seed}); {checked} requests equal to their idle answers, {hung_up} clients hung up, \
         {refused} bad requests refused, {swaps} scheduler swaps; RSS {first:.0} -> {last:.0} MiB after warm-up \
         (peak {peak:.0} MiB), slope {slope:+.2} MiB/min; KV pool back to baseline"
    );
    assert!(checked >= 4 && hung_up >= 4 && refused >= 10 && swaps >= 3, "too little happened: {checked} {hung_up} {refused} {swaps}");
    // A leak of even one small allocation per request shows as a steady climb; allocator noise
    // over a short run stays within a few MiB.
    assert!(last - first < 32.0 && slope < 30.0, "resident memory grew {first:.0} -> {last:.0} MiB ({slope:+.2} MiB/min)");
}
