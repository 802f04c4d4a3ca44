//! The built-in web page at `/ui`: a chat and completions playground, a live dashboard (the KV
//! block pool as a map, the batch, throughput and latency percentiles, preemptions, prefix-cache
//! hits) and the plugins panel (upload, activate, roll back through the admin API). The assets
//! (`host/ui/`) are embedded in the binary; the page polls `/ui/state`, one JSON document.
//!
//! Security: every page response carries a strict Content-Security-Policy: scripts, styles and
//! images from this origin only, no inline code, no frames; `connect-src` is this origin and,
//! when the admin API is on, its listener on the same host name. The routes sit behind the same
//! Host/Origin rules as the API. The page keeps the admin token in the tab's memory only and
//! sends it only to the admin listener.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::engine::EngineSnapshot;
use crate::metrics::{HistogramSnapshot, Metrics};
use crate::plugin::{FaultReason, PluginInfo};

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// The Content-Security-Policy of the page: `admin` is the admin listener's origin, if any.
fn content_security_policy(admin: Option<&str>) -> String {
    let connect = admin.map_or("'self'".to_string(), |a| format!("'self' {a}"));
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The admin listener's origin as the browser reaches it: the page's host name, the admin port.
fn admin_origin(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let port = *state.admin_port.get()?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok())?;
    let name = match host.strip_prefix('[') {
        Some(rest) => format!("[{}]", rest.split(']').next()?),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name).to_string(),
    };
    Some(format!("http://{name}:{port}"))
}

fn asset(state: &AppState, headers: &HeaderMap, content_type: &'static str, body: &'static str) -> Response {
    let csp = content_security_policy(admin_origin(state, headers).as_deref());
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // An admin origin that is not a valid header value (an odd Host) leaves it out, never the policy.
    let csp = HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_str(&content_security_policy(None)).expect("a static policy"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/javascript; charset=utf-8", APP_JS)
}

pub async fn stylesheet(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/css; charset=utf-8", APP_CSS)
}

/// `/ui/state`: what the page shows, at this moment.
#[derive(Serialize)]
pub struct UiState {
    model: String,
    max_model_len: usize,
    /// The admin listener's origin for the plugins panel (`None`: the admin API is off).
    admin: Option<String>,
    engine: EngineView,
    counters: Counters,
    time_to_first_token: HistogramSnapshot,
    time_per_output_token: HistogramSnapshot,
    plugins: Vec<PluginState>,
}

/// Most cells the block map has: a GPU pool of 350,000 blocks is drawn (and sent every second)
/// as this many cells, each standing for a run of consecutive blocks.
const MAX_CELLS: usize = 4096;

/// The engine as the dashboard shows it: the block map reduced to at most `MAX_CELLS` cells
/// (each the state most of its blocks are in), exact block counts, the batch.
#[derive(Serialize)]
struct EngineView {
    /// 0 free, 1 used, 2 prefix-cached: one per `blocks_per_cell` consecutive blocks.
    cells: Vec<u8>,
    blocks_per_cell: usize,
    num_blocks: usize,
    used: usize,
    cached: usize,
    free: usize,
    block_size: usize,
    running: usize,
    waiting: usize,
    policy: String,
}

impl EngineView {
    fn new(snapshot: EngineSnapshot) -> Self {
        let blocks = &snapshot.blocks;
        let count = |state: u8| blocks.iter().filter(|&&b| b == state).count();
        let per_cell = blocks.len().div_ceil(MAX_CELLS).max(1);
        let cells = blocks
            .chunks(per_cell)
            .map(|run| {
                let mut counts = [0usize; 3];
                for &b in run {
                    counts[usize::from(b.min(2))] += 1;
                }
                // Ties go to the busier state: used, then cached, then free.
                let most = counts.iter().copied().max().unwrap_or(0);
                [1u8, 2, 0].into_iter().find(|&s| counts[usize::from(s)] == most).unwrap_or(0)
            })
            .collect();
        EngineView {
            cells,
            blocks_per_cell: per_cell,
            num_blocks: blocks.len(),
            used: count(1),
            cached: count(2),
            free: count(0),
            block_size: snapshot.block_size,
            running: snapshot.running,
            waiting: snapshot.waiting,
            policy: snapshot.policy,
        }
    }
}

/// Totals since the server started; the page turns them into rates.
#[derive(Serialize)]
struct Counters {
    prompt_tokens: u64,
    generation_tokens: u64,
    preemptions: u64,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
    requests_finished: u64,
    requests_failed: u64,
}

/// One plugin as the panel lists it: the registry's view and its call metrics.
#[derive(Serialize)]
struct PluginState {
    #[serde(flatten)]
    info: PluginInfo,
    calls: u64,
    faults: u64,
    call_seconds: f64,
}

fn counter_sum(vec: &prometheus::IntCounterVec) -> u64 {
    let mut families = prometheus::core::Collector::collect(vec);
    families.iter_mut().flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value() as u64).collect::<Vec<_>>()).sum()
}

fn plugin_state(metrics: &Metrics, info: PluginInfo) -> PluginState {
    let labels = [info.kind, info.name.as_str()];
    let faults = FaultReason::ALL
        .iter()
        .map(|reason| metrics.plugin_faults.with_label_values(&[info.kind, &info.name, reason.as_str()]).get())
        .sum();
    PluginState {
        calls: metrics.plugin_calls.with_label_values(&labels).get(),
        faults,
        call_seconds: metrics.plugin_call_duration.with_label_values(&labels).get_sample_sum(),
        info,
    }
}

/// How long one engine snapshot serves every `/ui/state` caller: however many pages poll, the
/// engine thread answers at most a few snapshot commands a second.
const SNAPSHOT_REUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// The engine's snapshot, taken anew only when the last one is older than `SNAPSHOT_REUSE`
/// (callers meanwhile wait for the one being taken).
async fn engine_snapshot(state: &AppState) -> Result<EngineSnapshot, ApiError> {
    let mut cached = state.ui_snapshot.lock().await;
    if let Some((taken, snapshot)) = cached.as_ref() {
        if taken.elapsed() < SNAPSHOT_REUSE {
            return Ok(snapshot.clone());
        }
    }
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(5), state.engine.snapshot())
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine did not answer within 5 s", None, "unavailable"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None, "unavailable"))?;
    *cached = Some((std::time::Instant::now(), snapshot.clone()));
    Ok(snapshot)
}

pub async fn ui_state(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<UiState>, ApiError> {
    let engine = engine_snapshot(&state).await?;
    let m = &state.metrics;
    let plugins = state.plugins.as_ref().map_or_else(Vec::new, |p| p.list().into_iter().map(|info| plugin_state(m, info)).collect());
    Ok(Json(UiState {
        model: state.model_name.clone(),
        max_model_len: state.validator.max_model_len(),
        admin: admin_origin(&state, &headers),
        engine: EngineView::new(engine),
        counters: Counters {
            prompt_tokens: m.prompt_tokens.get(),
            generation_tokens: m.generation_tokens.get(),
            preemptions: m.num_preemptions.get(),
            prefix_cache_queries: m.prefix_cache_queries.get(),
            prefix_cache_hits: m.prefix_cache_hits.get(),
            requests_finished: counter_sum(&m.request_success),
            requests_failed: counter_sum(&m.request_failure),
        },
        time_to_first_token: Metrics::histogram_snapshot(&m.time_to_first_token),
        time_per_output_token: Metrics::histogram_snapshot(&m.time_per_output_token),
        plugins,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_only_this_origin_and_the_admin_listener() {
        let csp = content_security_policy(Some("http://127.0.0.1:9000"));
        assert!(csp.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"), "{csp}");
        assert!(csp.contains("connect-src 'self' http://127.0.0.1:9000;"), "{csp}");
        assert!(!csp.contains("unsafe"), "no inline code: {csp}");
        assert!(content_security_policy(None).contains("connect-src 'self';"));
    }

    #[test]
    fn a_large_pool_is_drawn_as_at_most_max_cells() {
        let view = |blocks: Vec<u8>| EngineView::new(EngineSnapshot { blocks, block_size: 16, running: 0, waiting: 0, policy: String::new() });
        let small = view(vec![0, 1, 2, 1]);
        assert_eq!((small.cells, small.blocks_per_cell, small.used, small.cached, small.free), (vec![0, 1, 2, 1], 1, 2, 1, 1));
        let mut blocks = vec![0u8; 10_000];
        blocks[..3].copy_from_slice(&[1, 2, 0]); // a three-way tie: shown as used
        blocks[3..6].copy_from_slice(&[2, 2, 0]);
        blocks[9_999] = 1;
        let large = view(blocks);
        assert_eq!((large.blocks_per_cell, large.cells.len()), (3, 3334));
        assert!(large.cells.len() <= MAX_CELLS);
        assert_eq!(&large.cells[..3], &[1, 2, 0]);
        assert_eq!(*large.cells.last().unwrap(), 1, "the last, short run");
        assert_eq!((large.num_blocks, large.used, large.cached, large.free), (10_000, 2, 3, 9_995));
    }

    #[test]
    fn the_assets_load_nothing_from_elsewhere_and_inline_nothing() {
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains(" style=") && !INDEX_HTML.contains("<style"));
        let inline_handler = INDEX_HTML.match_indices(" on").any(|(at, _)| {
            let rest = &INDEX_HTML[at + 3..];
            let name_len = rest.chars().take_while(|c| c.is_ascii_lowercase()).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!inline_handler, "no inline event handlers");
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!text.contains("https://") && !text.contains("//cdn"), "no remote resource");
        }
        assert!(!APP_JS.contains("localStorage") && !APP_JS.contains("sessionStorage") && !APP_JS.contains("document.cookie"), "the admin token is never stored");
    }
}
