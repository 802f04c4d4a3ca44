//! The admin API, on its own listener (`--admin-port`), behind a bearer token (`--admin-token` or
//! `PAGEDSERVE_ADMIN_TOKEN`; without one the listener is not started):
//!
//! - `GET /admin/plugins`: what is loaded, per kind and name: versions, sha256, which is active,
//!   the scheduler in use, and the filters in the order they run;
//! - `PUT /admin/plugins/{kind}/{name}`: the body is a component's bytes; its expected sha256
//!   (hex) comes in the `x-sha256` header or the `sha256` query parameter (required); an optional
//!   configuration in the `x-plugin-config` header or the `config` query parameter. The component
//!   is compiled off the serving path (a blocking task), checked against the kind's world, and
//!   activated; a scheduler becomes the engine's policy from the next step on;
//! - `POST /admin/plugins/{kind}/{name}/activate?version=N`: makes an earlier version active;
//! - `POST /admin/plugins/{kind}/{name}/rollback`: restores the version active before;
//! - `DELETE /admin/plugins/{kind}/{name}`: unloads every version (a scheduler in use is
//!   replaced by the native `--scheduling-policy`).
//!
//! Errors are JSON (`{"error": {"message", "type", "code"}}`) with the registry's statuses:
//! 400 bad name / hash mismatch / missing hash, 401 wrong or missing token, 404 unknown plugin,
//! 409 unknown version, 413 too large, 422 not a component of the kind's world or `configure`
//! failed. A refused change leaves what is active as it was. Every change is logged with the
//! client's address, the old and new hash and the result.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::plugin::{PluginKind, PluginRegistry, RegistryError};

/// What the admin handlers share.
pub struct AdminState {
    pub registry: Arc<PluginRegistry>,
    /// The bearer token every request must carry.
    pub token: String,
}

/// An admin API error: status and message, as JSON.
#[derive(Debug)]
pub struct AdminError {
    status: StatusCode,
    message: String,
}

impl AdminError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AdminError { status, message: message.into() }
    }
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        AdminError::new(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            s if s.is_client_error() => "BadRequestError",
            _ => "InternalServerError",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

pub fn router(state: Arc<AdminState>, access: Arc<super::guard::AccessPolicy>) -> Router {
    // The body limit is checked by `Upload` with a clear message; this only bounds what is read.
    let limit = state.registry.runtime().limits().max_component_bytes;
    let routes = Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/{kind}/{name}", put(upload).delete(remove))
        .route("/admin/plugins/{kind}/{name}/activate", post(activate))
        .route("/admin/plugins/{kind}/{name}/rollback", post(rollback))
        .fallback(|uri: axum::http::Uri| async move { AdminError::new(StatusCode::NOT_FOUND, format!("no admin route for {}", uri.path())) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            AdminError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}", uri.path()))
        })
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    super::guarded(routes, access)
}

/// Serves the admin API until `shutdown` resolves (the same connection handling as the API's).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    access: Arc<super::guard::AccessPolicy>,
    limits: super::listen::ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<super::listen::Drained> {
    super::listen::serve(listener, router(state, access), limits, shutdown).await
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match given {
        Some(token) if same(token.as_bytes(), state.token.as_bytes()) => next.run(request).await,
        _ => {
            let who = who(&request);
            tracing::warn!(who = %who, method = %request.method(), path = %request.uri().path(), "admin API: wrong or missing token");
            // Read (and drop) a body of allowed size first, so that a client still sending its
            // upload sees the 401 rather than a reset connection.
            let limit = state.registry.runtime().limits().max_component_bytes;
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if declared <= limit as u64 {
                let body = request.into_body();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), axum::body::to_bytes(body, limit)).await;
            }
            let mut response =
                AdminError::new(StatusCode::UNAUTHORIZED, "a valid admin bearer token is required").into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn who(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.to_string())
}

fn kind(kind: &str) -> Result<PluginKind, AdminError> {
    PluginKind::parse(kind).ok_or_else(|| {
        AdminError::new(StatusCode::NOT_FOUND, format!("unknown plugin kind `{kind}`: use scheduler, sampler, filter or constraint"))
    })
}

/// Runs a registry call on a blocking thread (compilation and instantiation take a while; a slot
/// lock may be held by the engine's call of the same plugin).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("admin task failed: {e}")))
}

async fn list(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let registry = &state.registry;
    Json(json!({"plugins": registry.list(), "filters": registry.filters()}))
}

/// A component upload: the declared `Content-Length` is checked before reading anything.
pub struct Upload(Bytes);

impl FromRequest<Arc<AdminState>> for Upload {
    type Rejection = AdminError;

    async fn from_request(request: Request, state: &Arc<AdminState>) -> Result<Self, AdminError> {
        let limit = state.registry.runtime().limits().max_component_bytes;
        let (who, path) = (who(&request), request.uri().path().to_string());
        let too_large = |size: String| {
            tracing::warn!(who = %who, %path, size = %size, limit, "plugin upload refused: too large");
            AdminError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is {size} bytes; the limit is {limit}"))
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&len| len > limit as u64) {
            return Err(too_large(len.to_string()));
        }
        match Bytes::from_request(request, state).await {
            Ok(bytes) if bytes.len() > limit => Err(too_large(bytes.len().to_string())),
            Ok(bytes) => Ok(Upload(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(too_large(format!("more than {limit}")))
            }
            Err(rejection) => Err(AdminError::new(rejection.status(), rejection.body_text())),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct UploadQuery {
    sha256: Option<String>,
    config: Option<String>,
}

async fn upload(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((kind_name, name)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    Upload(bytes): Upload,
) -> Result<Response, AdminError> {
    let kind = kind(&kind_name)?;
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let expected = header_text("x-sha256").or(query.sha256).ok_or_else(|| {
        tracing::warn!(who = %client, kind = %kind, %name, "plugin upload refused: no expected sha256");
        AdminError::new(StatusCode::BAD_REQUEST, "the expected sha256 of the upload is required (`x-sha256` header or `sha256` query parameter)")
    })?;
    let config = header_text("x-plugin-config").or(query.config).unwrap_or_default();
    let registry = state.registry.clone();
    let who = client.to_string();
    let result = blocking(move || -> Result<_, RegistryError> {
        let info = registry.install(kind, &name, &bytes, Some(&expected), &config, &who)?;
        // A scheduler becomes the engine's policy (a new version of the one in use takes effect
        // at the next step on its own).
        let in_use = registry.list().iter().any(|p| p.kind == "scheduler" && p.name == name && p.in_use);
        if kind == PluginKind::Scheduler && !in_use {
            registry.use_scheduler(&name, &who)?;
        }
        Ok((name, info))
    })
    .await?;
    let (name, info) = result?;
    Ok((StatusCode::CREATED, Json(json!({"kind": kind.as_str(), "name": name, "version": info}))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ActivateQuery {
    version: u32,
}

async fn activate(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((kind_name, name)): Path<(String, String)>,
    query: Result<Query<ActivateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let kind = kind(&kind_name)?;
    let Query(query) = query.map_err(|e| {
        AdminError::new(StatusCode::BAD_REQUEST, format!("activate needs `?version=N`, a version number: {}", e.body_text()))
    })?;
    let registry = state.registry.clone();
    let who = client.to_string();
    let version = query.version;
    blocking(move || -> Result<_, RegistryError> {
        registry.activate(kind, &name, version, &who)?;
        let in_use = registry.list().iter().any(|p| p.kind == "scheduler" && p.name == name && p.in_use);
        if kind == PluginKind::Scheduler && !in_use {
            registry.use_scheduler(&name, &who)?;
        }
        Ok(Json(json!({"kind": kind.as_str(), "name": name, "active_version": version})))
    })
    .await?
    .map_err(Into::into)
}

async fn rollback(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((kind_name, name)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let kind = kind(&kind_name)?;
    let registry = state.registry.clone();
    let who = client.to_string();
    blocking(move || -> Result<_, RegistryError> {
        let restored = registry.rollback(kind, &name, &who)?;
        Ok(Json(json!({"kind": kind.as_str(), "name": name, "active_version": restored})))
    })
    .await?
    .map_err(Into::into)
}

async fn remove(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((kind_name, name)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let kind = kind(&kind_name)?;
    let registry = state.registry.clone();
    let who = client.to_string();
    blocking(move || -> Result<_, RegistryError> {
        registry.remove(kind, &name, &who)?;
        Ok(Json(json!({"kind": kind.as_str(), "name": name, "removed": true})))
    })
    .await?
    .map_err(Into::into)
}
