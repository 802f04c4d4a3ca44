//! Helpers shared by the end-to-end tests: locating the `pagedserve` binary, the default model and
//! the reference outputs.

use std::path::PathBuf;

use serde_json::Value;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `pagedserve` binary of the same build as this test (`$PAGEDSERVE_BIN` overrides).
/// `cargo test --workspace` builds it before running any test.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("PAGEDSERVE_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/pagedserve
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("pagedserve");
    assert!(path.exists(), "{} is missing: build it with `cargo build --release`", path.display());
    path
}

/// The default model; a missing file fails the test with the command that fetches it.
pub fn model_path() -> PathBuf {
    let path = match std::env::var("PAGEDSERVE_MODEL") {
        Ok(path) => PathBuf::from(path),
        Err(_) => repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// A plugin component built by `scripts/build-plugins.sh` (`plugins/dist/NAME.wasm`).
pub fn plugin_component(name: &str) -> PathBuf {
    let path = repo_root().join("plugins/dist").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/build-plugins.sh", path.display());
    path
}

/// The bytes of [`plugin_component`]`(name)`.
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    std::fs::read(plugin_component(name)).unwrap()
}

/// Lower-case hex SHA-256 of `bytes` (the admin API's `x-sha256`).
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One entry of a plugins config: the component named `name`, with its `config`.
pub fn plugin_entry(name: &str, config: Value) -> Value {
    serde_json::json!({"name": name, "path": plugin_component(name), "config": config})
}

/// Writes a plugins config file (for `--plugins-config`) named after `test`; returns its path.
pub fn plugins_config_file(test: &str, config: &Value) -> String {
    let path = std::env::temp_dir().join(format!("pagedserve-plugins-{}-{test}.json", std::process::id()));
    std::fs::write(&path, config.to_string()).unwrap();
    path.display().to_string()
}

/// `shared/reference/smollm2_subset.json` (`$PAGEDSERVE_REFERENCE` overrides).
pub fn reference() -> Value {
    let path = match std::env::var("PAGEDSERVE_REFERENCE") {
        Ok(path) => PathBuf::from(path),
        Err(_) => repo_root().join("../shared/reference/smollm2_subset.json"),
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// Token ids from a JSON array.
pub fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("an array of ids").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

/// A `pagedserve serve` process on a free port, with the real model; killed on drop.
///
/// The server runs under a small `sh` wrapper that kills it when the wrapper's stdin closes, so a
/// server held in a `static` (shared by the tests of one binary) still goes away when the test
/// process exits.
///
/// The binary is `binary()`: `target/release/pagedserve` of this build, or `$PAGEDSERVE_BIN`.
pub struct Server {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    agent: ureq::Agent,
    /// `http://127.0.0.1:PORT` of the admin API, when started with `--admin-port`.
    admin_base: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// An HTTP answer: status, headers of interest, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Server {
    /// Starts `pagedserve serve --model <default> --port 0 ARGS` and waits until `/health` is 200.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_model(&model_path(), args)
    }

    /// Starts `pagedserve serve --model MODEL --port 0 ARGS` and waits until `/health` is 200.
    pub fn start_with_model(model: &std::path::Path, args: &[&str]) -> Server {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        // The server runs in the background; a watcher kills it once stdin closes; the wrapper
        // exits with the server (so a server that fails to start is seen at once).
        let script = r#"exec 3<&0; "$0" "$@" & pid=$!; (read _ignored <&3; kill $pid 2>/dev/null) & wait $pid"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(binary())
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pagedserve serve");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let thread_log = log.clone();
        let admin_base = std::sync::Arc::new(std::sync::Mutex::new(None));
        let thread_admin = admin_base.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("admin API listening on http://") {
                    *thread_admin.lock().unwrap() = Some(line[at + "admin API listening on ".len()..].trim().to_string());
                } else if let Some(at) = line.find("listening on http://") {
                    let _ = address_tx.send(line[at + "listening on ".len()..].trim().to_string());
                }
                thread_log.lock().unwrap().push(line);
            }
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(600)))
            .build()
            .into();
        let mut server = Server { child, base: String::new(), log, agent, admin_base };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(base) = address_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                server.base = base;
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                std::thread::sleep(std::time::Duration::from_millis(100));
                panic!("pagedserve serve exited ({status}) before listening:\n{}", server.log());
            }
            assert!(std::time::Instant::now() < deadline, "pagedserve did not print its address:\n{}", server.log());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while server.get("/health").status != 200 {
            assert!(std::time::Instant::now() < deadline, "/health never became 200:\n{}", server.log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut response = response.expect("HTTP request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = response.body_mut().with_config().limit(64 << 20).read_to_string().expect("reading the body");
        Reply { status, content_type, body }
    }

    pub fn get(&self, path: &str) -> Reply {
        Self::reply(self.agent.get(&self.url(path)).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        Self::reply(self.agent.post(&self.url(path)).send_json(body))
    }

    /// POSTs JSON with extra headers.
    pub fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.agent.post(&self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::reply(request.send_json(body))
    }

    /// The admin API's URL for `path` (the server must run with `--admin-port` and a token).
    pub fn admin_url(&self, path: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(base) = self.admin_base.lock().unwrap().clone() {
                return format!("{base}{path}");
            }
            assert!(std::time::Instant::now() < deadline, "the admin API did not print its address:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// One admin API call: `method` GET, PUT (with `body`), POST or DELETE, with `token` as the
    /// bearer token (none: no `Authorization` header) and extra headers.
    pub fn admin(&self, method: &str, path: &str, token: Option<&str>, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let url = self.admin_url(path);
        let auth = token.map(|t| format!("Bearer {t}"));
        macro_rules! with_headers {
            ($request:expr) => {{
                let mut request = $request;
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth.as_str());
                }
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request
            }};
        }
        let response = match method {
            "GET" => with_headers!(self.agent.get(&url)).call(),
            "DELETE" => with_headers!(self.agent.delete(&url)).call(),
            "PUT" => with_headers!(self.agent.put(&url)).send(body),
            "POST" => with_headers!(self.agent.post(&url)).send(body),
            other => panic!("unsupported method {other}"),
        };
        Self::reply(response)
    }

    /// Sends `request` as written (it should say `Connection: close`) on a fresh connection and
    /// returns everything the server answers until it closes the connection (or 30 s pass).
    pub fn raw(&self, request: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(self.address()).expect("connecting");
        socket.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        socket.write_all(request).expect("sending");
        let mut response = Vec::new();
        let _ = socket.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Opens a connection and sends a JSON POST of `body` to `path` without reading anything:
    /// the caller reads the answer, or hangs up.
    pub fn open_post(&self, path: &str, body: &Value) -> std::net::TcpStream {
        use std::io::Write;
        let address = self.address();
        let mut socket = std::net::TcpStream::connect(address).expect("connecting");
        let body = body.to_string();
        write!(
            socket,
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("sending");
        socket
    }

    /// Polls `/metrics` until the KV-cache usage is back to `baseline`, or fails after `within`.
    pub fn wait_for_kv_usage(&self, baseline: f64, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let usage = self.metric("pagedserve_kv_cache_usage_perc");
            if usage <= baseline {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "KV usage stuck at {usage} (baseline {baseline}):\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The server's process id (the child of the `sh` wrapper).
    pub fn pid(&self) -> u32 {
        let wrapper = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")).expect("reading the wrapper's children");
        children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("the server process")
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Stops the server as an operator would (SIGTERM) and waits up to `within` for it to exit;
    /// returns its exit code (`None`: killed by a signal) and how long it took, or panics.
    pub fn terminate(&mut self, within: std::time::Duration) -> (Option<i32>, std::time::Duration) {
        let started = std::time::Instant::now();
        // Closing stdin makes the wrapper send SIGTERM; the wrapper exits with the server's code.
        drop(self.child.stdin.take());
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                return (status.code(), started.elapsed());
            }
            assert!(started.elapsed() < within, "the server did not exit within {within:?} of SIGTERM:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// POSTs raw bytes as JSON.
    pub fn post_raw(&self, path: &str, body: &str) -> Reply {
        Self::reply(self.agent.post(&self.url(path)).header("content-type", "application/json").send(body))
    }

    /// POSTs and expects 200 with a JSON body.
    pub fn post_ok(&self, path: &str, body: &Value) -> Value {
        let reply = self.post(path, body);
        assert_eq!(reply.status, 200, "{path} {body}: {}", reply.body);
        reply.json()
    }

    /// The text of choice 0 of a completion (`text`) or chat completion (`message.content`).
    pub fn complete(&self, path: &str, body: &Value) -> String {
        let answer = self.post_ok(path, body);
        let choice = &answer["choices"][0];
        choice["text"].as_str().or(choice["message"]["content"].as_str()).expect("choice text").to_string()
    }

    /// POSTs with `stream: true` and returns every `data:` chunk before `[DONE]` (which must come).
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        use std::io::BufRead;
        let mut body = body.clone();
        body["stream"] = true.into();
        let response = self.agent.post(&self.url(path)).send_json(&body).expect("HTTP request");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        let mut chunks = Vec::new();
        for line in reader.lines() {
            let line = line.expect("reading the stream");
            if line.is_empty() {
                continue;
            }
            let data = line.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {line:?}"));
            if data == "[DONE]" {
                return chunks;
            }
            chunks.push(serde_json::from_str(data).expect("chunk JSON"));
        }
        panic!("the stream ended without [DONE]: {chunks:?}");
    }

    /// `/metrics`, parsed by a real Prometheus text parser.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        let reply = self.get("/metrics");
        assert_eq!(reply.status, 200);
        prometheus_parse::Scrape::parse(reply.body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
    }

    /// A histogram's observations: (all of them, those at most `le`, which must be a bucket bound).
    pub fn histogram_at_most(&self, name: &str, le: f64) -> (f64, f64) {
        let scrape = self.scrape();
        let histogram = scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("no histogram {name}"));
        let prometheus_parse::Value::Histogram(buckets) = &histogram.value else { panic!("{name} is not a histogram") };
        let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
        let at_most = buckets.iter().find(|b| b.less_than == le).unwrap_or_else(|| panic!("{name} has no bucket {le}: {buckets:?}"));
        (total, at_most.count)
    }

    /// The sum of a counter or gauge over its series (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.scrape()
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper kill the server and wait for it.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The concatenated text of streamed chunks for choice `index` (completions' `text` or chat's
/// `delta.content`), and its `finish_reason`.
pub fn stream_text(chunks: &[Value], index: u64) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            if choice["index"].as_u64() != Some(index) {
                continue;
            }
            if let Some(t) = choice["text"].as_str().or(choice["delta"]["content"].as_str()) {
                text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                assert!(finish.is_none(), "two finish_reasons for choice {index}");
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}
