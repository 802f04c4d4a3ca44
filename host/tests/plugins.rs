//! Wasm plugins with real components (built by `scripts/build-plugins.sh` into `plugins/dist/`)
//! and the in-process engine on the real default model: example plugins change behaviour
//! observably; hostile plugins are contained within their deadline or limit, counted in metrics
//! and handled by their kind's fail policy while the engine keeps serving correctly; schedulers
//! swap under load without changing any greedy output; the registry refuses bad uploads and keeps
//! what is active; constraint plugins hold outputs to their rule, and hostile ones fail only the
//! requests that chose them; a component built for the 0.1.0 contract still loads and runs.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagedserve::engine::{EngineConfig, EngineHandle, GenerateRequest, StreamEvent};
use pagedserve::metrics::Metrics;
use pagedserve::plugin::{
    FilterParams, FilterRequest, FilterVerdict, PluginKind, PluginLimits, PluginRegistry, PluginRuntime,
    PluginsConfig, RegistryError, WasmScheduler, MAX_VERSIONS,
};
use pagedserve::runner::CpuBackend;
use pagedserve::sampling::SamplingParams;
use pagedserve::sched::{native_policy, Budget, PolicyError, SchedulerConfig, SchedulingPolicy, SeqView};

use common::loaded_model;

fn dist_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/dist")).join(format!("{name}.wasm"))
}

/// A component of `plugins/dist`; missing ones fail with the command that builds them.
fn component(name: &str) -> Vec<u8> {
    let path = dist_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", path.display()))
}

fn registry_with(limits: PluginLimits) -> (Arc<PluginRegistry>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new("test"));
    (PluginRegistry::new(PluginRuntime::new(limits).unwrap(), metrics.clone()), metrics)
}

/// Limits for containment tests: the breaker out of the way.
fn lenient() -> PluginLimits {
    PluginLimits { breaker_faults: 10_000, ..PluginLimits::default() }
}

/// The value of the first series of `name` whose labels contain every one of `labels`.
/// The sum of the series of `name` whose labels contain every one of `labels`.
fn metric(metrics: &Metrics, name: &str, labels: &[&str]) -> f64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

struct TestEngine {
    handle: EngineHandle,
    metrics: Arc<Metrics>,
    registry: Arc<PluginRegistry>,
    runtime: tokio::runtime::Runtime,
}

fn engine(num_blocks: usize, max_num_seqs: usize, limits: PluginLimits) -> TestEngine {
    let loaded = loaded_model();
    let backend = CpuBackend::new(loaded.model.clone(), num_blocks, 16);
    let metrics = Arc::new(Metrics::new("test"));
    let config = EngineConfig {
        scheduler: SchedulerConfig::new(max_num_seqs, 512),
        max_model_len: 2048,
        max_queue: 1024,
        prefix_caching: false,
        async_scheduling: false,
    };
    let tokenizer = loaded.tokenizer.clone().unwrap();
    let (handle, _thread) =
        EngineHandle::spawn(Box::new(backend), tokenizer, metrics.clone(), native_policy("fcfs").unwrap(), config);
    let plugin_runtime = PluginRuntime::new(limits).unwrap();
    plugin_runtime.set_vocabulary(pagedserve::constraint::token_bytes(loaded.tokenizer.as_ref().unwrap()).unwrap());
    let registry = PluginRegistry::new(plugin_runtime, metrics.clone());
    registry.attach_engine(handle.clone()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    TestEngine { handle, metrics, registry, runtime }
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Tokens(Vec<u32>),
    Failed(String),
}

impl Outcome {
    fn tokens(&self) -> &[u32] {
        match self {
            Outcome::Tokens(t) => t,
            Outcome::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

impl TestEngine {
    fn install(&self, kind: PluginKind, name: &str, file: &str, config: &str) {
        self.registry.install(kind, name, &component(file), None, config, "test").unwrap();
    }

    /// Submits the requests in order; answers each one's outcome and the order they finished in.
    fn run(&self, requests: Vec<GenerateRequest>) -> (Vec<Outcome>, Vec<usize>) {
        self.runtime.block_on(async {
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut tasks = Vec::new();
            for (i, request) in requests.into_iter().enumerate() {
                let mut stream = self.handle.submit(request).expect("submitted");
                let done_tx = done_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tokens = Vec::new();
                    let mut outcome = None;
                    while let Some(event) = stream.next().await {
                        match event {
                            StreamEvent::Delta { token_ids, .. } => tokens.extend(token_ids),
                            StreamEvent::Done { .. } => outcome = Some(Outcome::Tokens(std::mem::take(&mut tokens))),
                            StreamEvent::Error(e) => outcome = Some(Outcome::Failed(e.to_string())),
                            StreamEvent::Finished { .. } => {}
                        }
                    }
                    let _ = done_tx.send(i);
                    outcome.expect("a last event")
                }));
            }
            drop(done_tx);
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            let mut order = Vec::new();
            while let Some(i) = done_rx.recv().await {
                order.push(i);
            }
            (outcomes, order)
        })
    }
}

fn prompts(count: usize) -> Vec<Vec<u32>> {
    let tokenizer = loaded_model().tokenizer.as_ref().unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in \
                fixed-size blocks, like virtual memory pages, so a serving engine wastes little memory. ";
    let base = tokenizer.encode(&text.repeat(4), false).unwrap();
    (0..count).map(|i| base[i % 7..i % 7 + 3 + (i * 13) % 40].to_vec()).collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(prompt, max_tokens) }
}

fn views(n: u64) -> Vec<SeqView<'static>> {
    (0..n)
        .map(|i| SeqView {
            id: 100 + i,
            priority: (i % 3) as i32,
            tenant: ["a", "b"][(i % 2) as usize],
            arrival: i,
            prompt_tokens: 10,
            computed_tokens: 0,
            generated_tokens: 0,
            max_tokens: 16,
            blocks_held: 0,
            running: false,
        })
        .collect()
}

const BUDGET: Budget = Budget { free_blocks: 64, total_blocks: 64, block_size: 16, token_budget: 512, max_seqs: 8 };

// ---------------------------------------------------------------------------------------------
// Registry

#[test]
fn the_registry_refuses_a_wrong_hash_a_wrong_world_an_oversized_or_invalid_upload_and_keeps_the_active_plugin() {
    // fcfs, priority and the hostile plugins are under 60 kB; fair-share and mirostat are over.
    let limits = PluginLimits { max_component_bytes: 60_000, ..PluginLimits::default() };
    let (registry, _) = registry_with(limits);
    let fcfs = component("fcfs");
    let v1 = registry.install(PluginKind::Scheduler, "main", &fcfs, None, "", "test").unwrap();
    assert_eq!((v1.version, v1.active), (1, true));
    let active = || {
        let info = registry.list().into_iter().find(|p| p.name == "main").unwrap();
        (info.active_version, info.versions.len())
    };

    let wrong_hash = "0".repeat(64);
    let err = registry.install(PluginKind::Scheduler, "main", &component("priority"), Some(&wrong_hash), "", "t");
    assert!(matches!(err, Err(RegistryError::HashMismatch { .. })), "{err:?}");

    let err = registry.install(PluginKind::Scheduler, "main", &component("hostile-sampler"), None, "", "t").unwrap_err();
    let message = err.to_string();
    assert!(message.contains("not a `scheduler` plugin") && message.contains("it is a `sampler` plugin"), "{message}");
    assert_eq!(err.status(), 422);

    let err = registry.install(PluginKind::Scheduler, "main", &component("fair-share"), None, "", "t").unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err:?}");
    assert_eq!(err.status(), 413);

    let err = registry.install(PluginKind::Scheduler, "main", b"\0asm garbage", None, "", "t").unwrap_err();
    assert!(err.to_string().contains("not a valid WebAssembly component"), "{err}");

    let err = registry.install(PluginKind::Scheduler, "Bad Name", &fcfs, None, "", "t").unwrap_err();
    assert!(matches!(err, RegistryError::BadName(_)));

    // A configuration its `configure` refuses.
    let (roomy, _) = registry_with(PluginLimits::default());
    let err = roomy.install(PluginKind::Scheduler, "main", &component("fair-share"), None, "{\"nope\": 1}", "t");
    assert!(matches!(err, Err(RegistryError::Setup(_))), "{err:?}");
    assert!(roomy.list().is_empty());

    assert_eq!(active(), (Some(1), 1), "the active plugin is unchanged");
    assert!(registry.list().iter().all(|p| p.name == "main"), "nothing else was registered");

    // The right hash is accepted; rollback restores version 1; remove forgets it.
    let sha = pagedserve::plugin::sha256_hex(&component("priority"));
    let v2 = registry.install(PluginKind::Scheduler, "main", &component("priority"), Some(&sha), "", "t").unwrap();
    assert_eq!((v2.version, v2.sha256.as_str()), (2, sha.as_str()));
    assert_eq!(registry.rollback(PluginKind::Scheduler, "main", "t").unwrap(), Some(1));
    registry.activate(PluginKind::Scheduler, "main", 2, "t").unwrap();
    assert_eq!(active(), (Some(2), 2));
    registry.remove(PluginKind::Scheduler, "main", "t").unwrap();
    assert!(registry.list().is_empty());
}

#[test]
fn a_slot_keeps_its_latest_versions_only() {
    let (registry, _) = registry_with(PluginLimits::default());
    let (fcfs, priority) = (component("fcfs"), component("priority"));
    for i in 0..MAX_VERSIONS + 4 {
        let bytes = if i % 2 == 0 { &fcfs } else { &priority };
        registry.install(PluginKind::Scheduler, "main", bytes, None, "", "t").unwrap();
    }
    let info = registry.list().into_iter().find(|p| p.name == "main").unwrap();
    let kept: Vec<u32> = info.versions.iter().map(|v| v.version).collect();
    let newest = (MAX_VERSIONS + 4) as u32;
    assert_eq!(kept, (newest - MAX_VERSIONS as u32 + 1..=newest).collect::<Vec<_>>(), "the oldest were dropped");
    assert_eq!(info.active_version, Some(newest));
    // Rollback walks back through the kept versions only, then leaves the slot inactive.
    for expected in (newest - MAX_VERSIONS as u32 + 1..newest).rev() {
        assert_eq!(registry.rollback(PluginKind::Scheduler, "main", "t").unwrap(), Some(expected));
    }
    assert_eq!(registry.rollback(PluginKind::Scheduler, "main", "t").unwrap(), None);
    assert!(registry.activate(PluginKind::Scheduler, "main", 1, "t").is_err(), "version 1 is gone");

    // An old version activated again is recent: uploads drop others, and a rollback returns to
    // it; rolling back never stalls on one version.
    let oldest_kept = newest - MAX_VERSIONS as u32 + 1;
    registry.activate(PluginKind::Scheduler, "main", newest, "t").unwrap();
    registry.activate(PluginKind::Scheduler, "main", oldest_kept, "t").unwrap();
    registry.activate(PluginKind::Scheduler, "main", newest, "t").unwrap();
    registry.activate(PluginKind::Scheduler, "main", oldest_kept, "t").unwrap();
    let uploaded = registry.install(PluginKind::Scheduler, "main", &fcfs, None, "", "t").unwrap().version;
    let info = registry.list().into_iter().find(|p| p.name == "main").unwrap();
    assert!(info.versions.iter().any(|v| v.version == oldest_kept), "the version a rollback restores is kept");
    assert_eq!(info.versions.len(), MAX_VERSIONS);
    assert_eq!(registry.rollback(PluginKind::Scheduler, "main", "t").unwrap(), Some(oldest_kept));
    assert_eq!(registry.rollback(PluginKind::Scheduler, "main", "t").unwrap(), Some(newest));
    let next = registry.rollback(PluginKind::Scheduler, "main", "t").unwrap();
    assert!(next != Some(newest) && next != Some(uploaded), "{next:?}");
}

#[test]
fn the_config_file_loads_plugins_in_order() {
    let (registry, _) = registry_with(PluginLimits::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugins.json");
    let dist = dist_path("x").parent().unwrap().to_path_buf();
    let config = serde_json::json!({
        "samplers": [{"name": "typical", "path": dist.join("typical.wasm"), "config": {"p": 0.9}}],
        "filters": [
            {"name": "api-keys", "path": dist.join("api-keys.wasm"),
             "config": {"keys": {"sk-1": {"tenant": "acme"}}}},
            {"name": "max-tokens", "path": dist.join("max-tokens.wasm"), "config": {"max_tokens": 8},
             "sha256": pagedserve::plugin::sha256_hex(&component("max-tokens"))},
        ],
    });
    std::fs::write(&path, config.to_string()).unwrap();
    PluginsConfig::load(&path).unwrap().apply(&registry).unwrap();
    assert_eq!(registry.filters(), vec!["api-keys", "max-tokens"]);
    assert!(registry.sampler("typical").is_some());
    let verdict = registry.filter_request(&request(&[("authorization", "Bearer sk-1")], "hello", 100)).unwrap();
    match verdict {
        FilterVerdict::Modify(p) => assert_eq!((p.tenant.as_str(), p.max_tokens), ("acme", 8)),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

fn request(headers: &[(&str, &str)], prompt: &str, max_tokens: u32) -> FilterRequest {
    FilterRequest {
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        prompt: prompt.into(),
        params: FilterParams {
            max_tokens,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            priority: 0,
            tenant: String::new(),
            sampler: None,
        },
    }
}

fn status(verdict: &FilterVerdict) -> Option<u16> {
    match verdict {
        FilterVerdict::Reject { status, .. } => Some(*status),
        _ => None,
    }
}

#[test]
fn filters_authenticate_rate_limit_clamp_and_block() {
    let (registry, _) = registry_with(PluginLimits::default());
    let keys = r#"{"keys": {"sk-acme": {"tenant": "acme", "priority": -1}, "sk-beta": {"tenant": "beta"}}}"#;
    registry.install(PluginKind::Filter, "api-keys", &component("api-keys"), None, keys, "t").unwrap();
    let limit = r#"{"capacity": 3, "refill_per_second": 0.001}"#;
    registry.install(PluginKind::Filter, "rate-limit", &component("rate-limit"), None, limit, "t").unwrap();
    registry.install(PluginKind::Filter, "max-tokens", &component("max-tokens"), None, r#"{"max_tokens": 64}"#, "t").unwrap();
    registry.install(PluginKind::Filter, "blocklist", &component("blocklist"), None, r#"{"words": ["forbidden"]}"#, "t").unwrap();

    let acme = [("authorization", "Bearer sk-acme")];
    assert_eq!(status(&registry.filter_request(&request(&[("authorization", "Bearer wrong")], "hi", 8)).unwrap()), Some(401));
    assert_eq!(status(&registry.filter_request(&request(&[], "hi", 8)).unwrap()), Some(401));
    match registry.filter_request(&request(&acme, "hi", 1000)).unwrap() {
        FilterVerdict::Modify(p) => assert_eq!((p.tenant.as_str(), p.priority, p.max_tokens), ("acme", -1, 64)),
        other => panic!("{other:?}"),
    }
    let verdict = registry.filter_request(&request(&acme, "a Forbidden word", 8)).unwrap();
    assert_eq!(status(&verdict), Some(400));
    // acme's bucket of 3: two taken above, one more passes, the next gets 429; beta still passes.
    assert!(matches!(registry.filter_request(&request(&acme, "hi", 8)).unwrap(), FilterVerdict::Modify(_)));
    let verdict = registry.filter_request(&request(&acme, "hi", 8)).unwrap();
    assert_eq!(status(&verdict), Some(429), "{verdict:?}");
    let verdict = registry.filter_request(&request(&[("x-api-key", "sk-beta")], "hi", 8)).unwrap();
    assert!(matches!(verdict, FilterVerdict::Modify(ref p) if p.tenant == "beta"), "{verdict:?}");
    // Output filtering.
    assert_eq!(registry.run_output_filters("acme", "all fine", 3).unwrap(), None);
    let (plugin, _reason) = registry.run_output_filters("acme", "now FORBIDDEN", 3).unwrap().expect("stopped");
    assert_eq!(plugin, "blocklist");
}

#[test]
fn hostile_filters_fail_closed_naming_the_plugin() {
    let (registry, metrics) = registry_with(lenient());
    for (mode, reason) in [
        ("loop", "deadline"),
        ("trap", "trap"),
        ("memory", "limit"),
        ("bad-status", "invalid_output"),
        ("huge-message", "invalid_output"),
    ] {
        registry.install(PluginKind::Filter, "hostile", &component("hostile-filter"), None, mode, "t").unwrap();
        let started = Instant::now();
        let fault = registry.filter_request(&request(&[], "hi", 8)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "{mode} took {:?}", started.elapsed());
        assert_eq!(fault.status(), 503);
        assert_eq!(fault.plugin, "hostile");
        assert!(fault.to_string().contains("`hostile`"), "{fault}");
        assert_eq!(fault.error.reason().map(|r| r.as_str()), Some(reason), "{mode}: {fault}");
        assert!(metric(&metrics, "pagedserve_plugin_faults_total", &["kind=\"filter\"", &format!("reason=\"{reason}\"")]) >= 1.0);
    }
    // A healthy version again: the next call works on a fresh instance.
    registry.install(PluginKind::Filter, "hostile", &component("hostile-filter"), None, "ok", "t").unwrap();
    assert_eq!(registry.filter_request(&request(&[], "hi", 8)).unwrap(), FilterVerdict::Continue);
}

// ---------------------------------------------------------------------------------------------
// Schedulers, contained

#[test]
fn hostile_schedulers_are_contained_within_their_deadline_or_limit() {
    // A deadline well above the time `huge` needs to build and hand over its million-entry answer
    // on a busy machine (at 20 ms it sometimes ran out first and counted as a deadline): only
    // `loop` may meet it.
    let (registry, metrics) = registry_with(PluginLimits { scheduler_deadline: Duration::from_millis(200), ..lenient() });
    let seqs = views(40);
    for (mode, reason) in [
        ("loop", "deadline"),
        ("memory", "limit"),
        ("trap", "trap"),
        ("recursion", "limit"),
        ("unknown-ids", "invalid_output"),
        ("duplicates", "invalid_output"),
        ("missing", "invalid_output"),
        ("huge", "invalid_output"),
        ("error", "invalid_output"),
    ] {
        registry.install(PluginKind::Scheduler, "hostile", &component("hostile-scheduler"), None, mode, "t").unwrap();
        let mut policy = WasmScheduler::new(registry.slot(PluginKind::Scheduler, "hostile").unwrap(), Box::new(pagedserve::sched::Fcfs));
        let before = metric(&metrics, "pagedserve_plugin_faults_total", &[&format!("reason=\"{reason}\"")]);
        let started = Instant::now();
        let answer = policy.rank(&seqs, &BUDGET);
        let took = started.elapsed();
        assert!(matches!(answer, Err(PolicyError::Failed(_))), "{mode}: {answer:?}");
        assert!(took < Duration::from_millis(500), "{mode} took {took:?}");
        let after = metric(&metrics, "pagedserve_plugin_faults_total", &[&format!("reason=\"{reason}\"")]);
        assert_eq!(after, before + 1.0, "{mode} counted as {reason}: {answer:?}");
    }
    assert!(metric(&metrics, "pagedserve_plugin_call_duration_seconds_count", &["kind=\"scheduler\""]) >= 9.0);
}

#[test]
fn the_circuit_breaker_disables_a_faulty_version_and_restores_the_previous_one() {
    let limits = PluginLimits { breaker_faults: 3, ..PluginLimits::default() };
    let (registry, metrics) = registry_with(limits);
    let hostile = component("hostile-scheduler");
    registry.install(PluginKind::Scheduler, "s", &hostile, None, "ok", "t").unwrap();
    registry.install(PluginKind::Scheduler, "s", &hostile, None, "trap", "t").unwrap();
    let slot = registry.slot(PluginKind::Scheduler, "s").unwrap();
    let mut policy = WasmScheduler::new(slot.clone(), Box::new(pagedserve::sched::Fcfs));
    let seqs = views(5);
    for _ in 0..3 {
        assert!(policy.rank(&seqs, &BUDGET).is_err());
    }
    assert_eq!(slot.active_version(), Some(1), "version 2 disabled, version 1 restored");
    assert_eq!(policy.rank(&seqs, &BUDGET).unwrap(), vec![100, 101, 102, 103, 104]);
    assert_eq!(metric(&metrics, "pagedserve_plugin_rollbacks_total", &["name=\"s\""]), 1.0);
    let info = registry.list().remove(0);
    assert!(info.versions.iter().any(|v| v.version == 2 && v.disabled));
    assert!(metric(&metrics, "pagedserve_plugin_active_info", &["name=\"s\"", "version=\"1\""]) == 1.0);

    // With nothing to restore, the slot goes inactive and the policy ranks natively (FCFS).
    registry.install(PluginKind::Scheduler, "lone", &hostile, None, "trap", "t").unwrap();
    let lone = registry.slot(PluginKind::Scheduler, "lone").unwrap();
    let mut policy = WasmScheduler::new(lone.clone(), Box::new(pagedserve::sched::Fcfs));
    for _ in 0..3 {
        assert!(policy.rank(&seqs, &BUDGET).is_err());
    }
    assert_eq!(lone.active_version(), None);
    assert_eq!(policy.rank(&seqs, &BUDGET).unwrap(), vec![100, 101, 102, 103, 104]);
}

// ---------------------------------------------------------------------------------------------
// Schedulers, in the engine

#[test]
fn under_priority_an_urgent_request_submitted_last_finishes_first() {
    let e = engine(256, 1, PluginLimits::default());
    e.install(PluginKind::Scheduler, "priority", "priority", "");
    e.registry.use_scheduler("priority", "test").unwrap();
    let p = prompts(5);
    // Four ordinary requests, then an urgent one; one sequence runs at a time.
    let mut requests: Vec<GenerateRequest> = p.iter().take(4).map(|x| greedy(x.clone(), 24)).collect();
    requests.push(GenerateRequest { priority: -10, ..greedy(p[4].clone(), 24) });
    let (outcomes, order) = e.run(requests);
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Tokens(t) if t.len() == 24)));
    assert_eq!(order[0], 4, "the urgent request finished first: {order:?}");
    let calls = metric(&e.metrics, "pagedserve_plugin_calls_total", &["kind=\"scheduler\"", "name=\"priority\""]);
    assert!(calls >= 100.0, "one call per step: {calls}\n{}", e.metrics.render());

    // The same under FCFS (as a plugin): it finishes last.
    e.install(PluginKind::Scheduler, "fcfs", "fcfs", "");
    e.registry.use_scheduler("fcfs", "test").unwrap();
    let mut requests: Vec<GenerateRequest> = p.iter().take(4).map(|x| greedy(x.clone(), 24)).collect();
    requests.push(GenerateRequest { priority: -10, ..greedy(p[4].clone(), 24) });
    let (_, order) = e.run(requests);
    assert_eq!(order[4], 4, "FCFS: submitted last, finished last: {order:?}");
}

#[test]
fn under_fair_share_a_flooding_tenant_does_not_starve_another() {
    let e = engine(256, 2, PluginLimits::default());
    e.install(PluginKind::Scheduler, "fair-share", "fair-share", "");
    e.registry.use_scheduler("fair-share", "test").unwrap();
    let p = prompts(12);
    let mut requests: Vec<GenerateRequest> =
        (0..10).map(|i| GenerateRequest { tenant: "flood".into(), ..greedy(p[i].clone(), 12) }).collect();
    requests.extend((10..12).map(|i| GenerateRequest { tenant: "late".into(), ..greedy(p[i].clone(), 12) }));
    let (outcomes, order) = e.run(requests);
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Tokens(_))));
    let rank = |i| order.iter().position(|&x| x == i).unwrap();
    assert!(rank(10) < 4 && rank(11) < 6, "the late tenant was served among the first: {order:?}");
}

#[test]
fn a_hostile_scheduler_in_the_engine_falls_back_to_fcfs_and_outputs_stay_identical() {
    let p = prompts(6);
    let reference = {
        let e = engine(256, 8, PluginLimits::default());
        e.run(p.iter().map(|x| greedy(x.clone(), 10)).collect()).0
    };
    for mode in ["loop", "trap", "unknown-ids", "huge"] {
        let e = engine(256, 8, PluginLimits { breaker_faults: 10_000, ..PluginLimits::default() });
        e.install(PluginKind::Scheduler, "hostile", "hostile-scheduler", mode);
        e.registry.use_scheduler("hostile", "test").unwrap();
        let (outcomes, _) = e.run(p.iter().map(|x| greedy(x.clone(), 10)).collect());
        assert_eq!(outcomes, reference, "{mode}");
        assert!(metric(&e.metrics, "pagedserve_scheduler_policy_faults_total", &["policy=\"wasm:hostile\""]) >= 10.0, "{mode}");
        assert!(metric(&e.metrics, "pagedserve_plugin_faults_total", &["name=\"hostile\""]) >= 10.0, "{mode}");
    }
}

#[test]
fn swapping_the_scheduler_every_200_ms_under_64_requests_changes_no_greedy_output() {
    let p = prompts(64);
    let requests = || p.iter().map(|x| greedy(x.clone(), 12)).collect::<Vec<_>>();
    let reference = engine(1024, 64, PluginLimits::default()).run(requests()).0;
    let e = engine(1024, 64, PluginLimits::default());
    for name in ["fcfs", "priority", "shortest-job-first", "fair-share"] {
        e.install(PluginKind::Scheduler, name, name, "");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (registry, stop) = (e.registry.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0;
            let cycle = ["fcfs", "priority", "native", "shortest-job-first", "fair-share"];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match cycle[swaps % cycle.len()] {
                    "native" => registry.use_native_scheduler("priority", "swapper").unwrap(),
                    name => registry.use_scheduler(name, "swapper").unwrap(),
                }
                swaps += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            swaps
        })
    };
    let (outcomes, _) = e.run(requests());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps >= 3, "only {swaps} swaps happened during the run");
    assert_eq!(outcomes.len(), 64);
    for (i, (got, want)) in outcomes.iter().zip(&reference).enumerate() {
        assert_eq!(got.tokens(), want.tokens(), "request {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Samplers

fn seeded(prompt: Vec<u32>, sampler: &str, seed: u64) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams { temperature: 1.0, seed: Some(seed), ..SamplingParams::default() },
        sampler: Some(sampler.into()),
        ..greedy(prompt, 16)
    }
}

#[test]
fn mirostat_and_typical_give_valid_tokens_deterministic_with_a_seed() {
    let e = engine(256, 8, PluginLimits::default());
    e.install(PluginKind::Sampler, "mirostat", "mirostat", r#"{"tau": 3.0}"#);
    e.install(PluginKind::Sampler, "typical", "typical", r#"{"p": 0.9}"#);
    let vocab = loaded_model().model.config().vocab_size as u32;
    let p = prompts(3);
    for sampler in ["mirostat", "typical"] {
        let batch = || vec![seeded(p[0].clone(), sampler, 7), seeded(p[1].clone(), sampler, 8), greedy(p[2].clone(), 16)];
        let (first, _) = e.run(batch());
        let (second, _) = e.run(batch());
        assert_eq!(first, second, "{sampler}: same seeds, same tokens");
        for o in &first {
            assert!(o.tokens().len() == 16 && o.tokens().iter().all(|&t| t < vocab), "{sampler}: {o:?}");
        }
        let (other, _) = e.run(vec![seeded(p[0].clone(), sampler, 99)]);
        assert_ne!(other[0], first[0], "{sampler}: another seed, other tokens");
        let calls = metric(&e.metrics, "pagedserve_plugin_calls_total", &[&format!("name=\"{sampler}\"")]);
        assert!(calls >= 32.0, "{sampler}: one call per step ({calls})");
    }
    // A request naming a sampler that is not loaded fails at once, with the name.
    let (outcomes, _) = e.run(vec![seeded(p[0].clone(), "nope", 1)]);
    assert!(matches!(&outcomes[0], Outcome::Failed(m) if m.contains("`nope`")), "{outcomes:?}");
}

#[test]
fn a_hostile_sampler_fails_only_the_requests_that_chose_it() {
    let p = prompts(4);
    let reference = engine(256, 8, PluginLimits::default()).run(vec![greedy(p[0].clone(), 16), greedy(p[1].clone(), 16)]).0;
    for (mode, reason) in [("out-of-vocab", "invalid_output"), ("wrong-count", "invalid_output"), ("loop", "deadline"), ("trap", "trap"), ("memory", "limit")] {
        let e = engine(256, 8, lenient());
        e.install(PluginKind::Sampler, "hostile", "hostile-sampler", mode);
        let requests = vec![
            greedy(p[0].clone(), 16),
            GenerateRequest { sampler: Some("hostile".into()), ..greedy(p[2].clone(), 16) },
            greedy(p[1].clone(), 16),
            GenerateRequest { sampler: Some("hostile".into()), ..greedy(p[3].clone(), 16) },
        ];
        let (outcomes, _) = e.run(requests);
        assert_eq!(outcomes[0], reference[0], "{mode}");
        assert_eq!(outcomes[2], reference[1], "{mode}");
        for o in [&outcomes[1], &outcomes[3]] {
            assert!(matches!(o, Outcome::Failed(m) if m.contains("sampler plugin `hostile`")), "{mode}: {o:?}");
        }
        assert!(metric(&e.metrics, "pagedserve_plugin_faults_total", &[&format!("reason=\"{reason}\"")]) >= 1.0, "{mode}");
        assert_eq!(metric(&e.metrics, "pagedserve_kv_cache_usage_perc", &[]), 0.0, "{mode}: blocks freed");
    }
    // A sampler asking for too many candidates is refused at load.
    let (registry, _) = registry_with(PluginLimits::default());
    let err = registry.install(PluginKind::Sampler, "h", &component("hostile-sampler"), None, "huge-top-n", "t").unwrap_err();
    assert!(err.to_string().contains("top-n"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Constraints

/// A greedy request held by constraint plugin `name` with `config`.
fn constrained(prompt: Vec<u32>, name: &str, config: &str, max_tokens: usize) -> GenerateRequest {
    let eos = loaded_model().tokenizer.as_ref().unwrap().eos_token_id().unwrap();
    GenerateRequest {
        constraint: Some(pagedserve::constraint::Constraint::plugin(name, config, eos)),
        ..GenerateRequest::greedy(prompt, max_tokens)
    }
}

fn text(tokens: &[u32]) -> String {
    loaded_model().tokenizer.as_ref().unwrap().decode(tokens, true).unwrap()
}

#[test]
fn constraint_plugins_hold_outputs_to_their_rule() {
    let e = engine(256, 8, PluginLimits::default());
    e.install(PluginKind::Constraint, "no-digits", "no-digits", "");
    e.install(PluginKind::Constraint, "regex", "regex", "");
    e.install(PluginKind::Constraint, "word-limit", "word-limit", "");
    let tokenizer = loaded_model().tokenizer.as_ref().unwrap();
    let counting = tokenizer.encode("Count to twenty: 1, 2, 3, 4, 5,", false).unwrap();
    let story = tokenizer.encode("Once upon a time, in a small village by the sea,", false).unwrap();
    let (free, _) = e.run(vec![GenerateRequest::greedy(counting.clone(), 24)]);
    assert!(text(free[0].tokens()).chars().any(|c| c.is_ascii_digit()), "unconstrained, the model counts: {:?}", text(free[0].tokens()));
    let requests = vec![
        constrained(counting.clone(), "no-digits", "", 24),
        constrained(counting.clone(), "regex", r#"{"pattern": "( [0-9]{1,2},){3} done"}"#, 40),
        constrained(story.clone(), "word-limit", r#"{"words": 5}"#, 40),
    ];
    let (outcomes, _) = e.run(requests);
    let no_digits = text(outcomes[0].tokens());
    assert!(!no_digits.is_empty() && !no_digits.chars().any(|c| c.is_ascii_digit()), "{no_digits:?}");
    let matched = text(outcomes[1].tokens());
    assert!(regex::Regex::new("^( [0-9]{1,2},){3} done$").unwrap().is_match(&matched), "{matched:?}");
    let words = text(outcomes[2].tokens());
    assert!(words.split_whitespace().count() <= 5 && !words.trim().is_empty(), "{words:?}");
    assert!(outcomes[2].tokens().len() < 40, "the answer ended: {words:?}");
    let calls = metric(&e.metrics, "pagedserve_plugin_calls_total", &["kind=\"constraint\""]);
    assert!(calls >= 10.0, "one call per step per plugin ({calls})");
}

#[test]
fn a_hostile_constraint_fails_only_the_requests_that_chose_it() {
    let p = prompts(4);
    let reference = engine(256, 8, PluginLimits::default()).run(vec![greedy(p[0].clone(), 16), greedy(p[1].clone(), 16)]).0;
    for (mode, reason) in [
        ("empty", Some("invalid_output")),
        ("out-of-vocab", Some("invalid_output")),
        ("wrong-count", Some("invalid_output")),
        ("loop", Some("deadline")),
        ("trap", Some("trap")),
        ("oom", Some("limit")),
        ("start-error", None),
    ] {
        let e = engine(256, 8, lenient());
        e.install(PluginKind::Constraint, "hostile", "hostile-constraint", "");
        let config = format!(r#"{{"mode": "{mode}"}}"#);
        let requests = vec![
            greedy(p[0].clone(), 16),
            constrained(p[2].clone(), "hostile", &config, 16),
            greedy(p[1].clone(), 16),
            constrained(p[3].clone(), "hostile", &config, 16),
        ];
        let (outcomes, _) = e.run(requests);
        assert_eq!(outcomes[0], reference[0], "{mode}");
        assert_eq!(outcomes[2], reference[1], "{mode}");
        for o in [&outcomes[1], &outcomes[3]] {
            assert!(matches!(o, Outcome::Failed(m) if m.contains("constraint plugin `hostile`")), "{mode}: {o:?}");
        }
        if let Some(reason) = reason {
            let faults = metric(&e.metrics, "pagedserve_plugin_faults_total", &["kind=\"constraint\"", &format!("reason=\"{reason}\"")]);
            assert!(faults >= 1.0, "{mode}: {faults}");
        }
        assert_eq!(metric(&e.metrics, "pagedserve_kv_cache_usage_perc", &[]), 0.0, "{mode}: blocks freed");
        // The plugin behaving again (a fresh instance after the fault) serves the next request.
        let (after, _) = e.run(vec![constrained(p[0].clone(), "hostile", r#"{"mode": "fine"}"#, 8)]);
        assert_eq!(after[0].tokens().len(), 8, "{mode}: {after:?}");
    }
    // A request naming a constraint that is not loaded fails at once, with the name.
    let e = engine(64, 4, PluginLimits::default());
    let (outcomes, _) = e.run(vec![constrained(p[0].clone(), "nope", "", 4)]);
    assert!(matches!(&outcomes[0], Outcome::Failed(m) if m.contains("`nope`")), "{outcomes:?}");
}

#[test]
fn a_component_built_for_the_0_1_0_contract_still_loads_and_schedules() {
    let bytes = component("fcfs-v0-1");
    let text = String::from_utf8_lossy(&bytes);
    let genuine = text.contains("pagedserve:plugins/types@0.1.0")
        && !text.contains("pagedserve:plugins/types@0.2.0")
        && !text.contains("pagedserve:plugins/host@0.2.0");
    assert!(genuine, "a component built for 0.1.0 only");
    let e = engine(256, 4, PluginLimits::default());
    let p = prompts(6);
    let requests = || p.iter().map(|prompt| greedy(prompt.clone(), 12)).collect::<Vec<_>>();
    let (native, native_order) = e.run(requests());
    e.install(PluginKind::Scheduler, "old-fcfs", "fcfs-v0-1", "");
    e.registry.use_scheduler("old-fcfs", "test").unwrap();
    let (outcomes, order) = e.run(requests());
    assert_eq!(outcomes, native, "the same tokens under the 0.1.0 FCFS");
    assert_eq!(order, native_order);
    let calls = metric(&e.metrics, "pagedserve_plugin_calls_total", &["name=\"old-fcfs\""]);
    assert!(calls >= 12.0, "it ranked every step ({calls})");
    assert_eq!(metric(&e.metrics, "pagedserve_plugin_faults_total", &["name=\"old-fcfs\""]), 0.0);
}
