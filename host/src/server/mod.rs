//! The HTTP front end (axum on hyper): OpenAI-compatible routes, SSE streaming, health and
//! Prometheus metrics. Handlers parse (`api`), validate (`validation`), submit to the engine
//! (`engine::EngineHandle`) and render the engine's events; they never block: parsing,
//! tokenizing and validating run on tokio's blocking threads, a bounded number at once
//! (`AppState::run_blocking`).
//!
//! Ownership rule that makes cancellation work: a handler's future (non-streaming) or its response
//! body stream (streaming) owns the `RequestStream`s of its engine requests, so a client that goes
//! away drops them, which aborts the requests and frees their KV blocks within one engine step.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`,
//! `GET /metrics`, `POST /tokenize`, `POST /detokenize`, and the built-in page under `/ui` (`ui`).
//! The admin API (`admin`) has its own listener.

pub mod admin;
mod body;
mod error;
mod generate;
pub mod guard;
pub mod listen;
mod render;
mod routes;
mod ui;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use self::error::ApiError;
use self::guard::AccessPolicy;
use self::listen::{ConnectionLimits, Drained};
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::plugin::PluginRegistry;
use crate::tokenizer::Tokenizer;
use crate::validation::Validator;

/// Default limit on request bodies (`--max-request-body`).
pub const DEFAULT_MAX_REQUEST_BODY: usize = 4 << 20;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub validator: Validator,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    /// The name clients use in `model` and see in responses.
    pub model_name: String,
    /// Where the weights came from (`/v1/models`' `root`).
    pub model_root: String,
    /// Unix seconds the server started.
    pub created: u64,
    /// Largest request body in bytes (`--max-request-body`).
    pub max_request_body: usize,
    /// How long a request body may take to arrive (`--body-read-timeout`).
    pub body_read_timeout: std::time::Duration,
    /// Loaded plugins: request filters run before submission, output filters on each delta.
    pub plugins: Option<Arc<PluginRegistry>>,
    /// Requests' CPU work (parsing, tokenizing, chat templates, grammars) running at once
    /// (`run_blocking`); the machine's cores by default.
    pub cpu_slots: Arc<tokio::sync::Semaphore>,
    /// The admin API's port, once its listener is bound (the page's plugins panel calls it).
    pub admin_port: std::sync::OnceLock<u16>,
    /// The engine snapshot `/ui/state` last took, and when (`ui`).
    pub ui_snapshot: tokio::sync::Mutex<Option<(std::time::Instant, crate::engine::EngineSnapshot)>>,
}

impl AppState {
    /// Permits for `cpu_slots`: one per core.
    pub fn default_cpu_slots() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
    }

    /// Runs a request's CPU work on tokio's blocking threads, at most `cpu_slots` at once (more
    /// wait their turn), so that a huge prompt never stalls the async workers: other streams,
    /// `/health` and `/metrics` keep going (TGI's validation workers do the same).
    pub async fn run_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&AppState) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.cpu_slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&state)
        })
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("request work failed: {e}"), None, "internal"))
    }

    /// A request's `model` must be absent or the served name.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(name) if !name.is_empty() && name != self.model_name => Err(ApiError::model_not_found(name)),
            _ => Ok(()),
        }
    }
}

/// The API's routes behind the browser access rules (`guard`).
pub fn router(state: Arc<AppState>, access: Arc<AccessPolicy>) -> Router {
    let max_request_body = state.max_request_body;
    let routes = Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::stylesheet))
        .route("/ui/state", get(ui::ui_state))
        .route("/", get(|| async { axum::response::Redirect::temporary("/ui") }))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_request_body))
        .with_state(state);
    guarded(routes, access)
}

/// `routes` behind the access rules: CORS (if any origin is allowed) inside the Host/Origin check.
pub(crate) fn guarded(routes: Router, access: Arc<AccessPolicy>) -> Router {
    let routes = match access.cors() {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes.layer(axum::middleware::from_fn_with_state(access, guard::check_access))
}

/// Serves until `shutdown` resolves, then lets requests in flight finish within the drain
/// deadline (`listen`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    access: Arc<AccessPolicy>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Drained> {
    listen::serve(listener, router(state, access), limits, shutdown).await
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
