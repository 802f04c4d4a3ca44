//! The request-body extractor of every JSON route:
//! - the body must be declared `application/json` (415 otherwise), so that a web page cannot
//!   reach a route with a form or `text/plain` "simple request" that skips the CORS preflight;
//! - it must arrive whole within `--body-read-timeout` (408), so a client that sends half a body
//!   cannot hold a connection;
//! - a body over `--max-request-body` (declared, or found while streaming in) gets 413 at once,
//!   and what the client still sends is read and dropped in the background (up to `DRAIN_LIMIT`
//!   bytes for up to `LINGER`): closing a socket with unread data resets it, and a client still
//!   writing its body would see a reset instead of the 413 (nginx's "lingering close").

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::AppState;

/// Most bytes of an oversized body read (and dropped) after the 413.
const DRAIN_LIMIT: usize = 64 << 20;
/// Longest an oversized body is drained after the 413.
const LINGER: Duration = Duration::from_secs(10);

pub struct RequestBody(pub Bytes);

impl FromRequest<Arc<AppState>> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        require_json(request.headers())?;
        let limit = state.max_request_body;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body = request.into_body();
        if declared.is_some_and(|len| len > limit as u64) {
            tokio::spawn(drain(body, 0));
            return Err(too_large(limit));
        }
        let mut bytes = Vec::new();
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}"), None))?;
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > limit {
                        return Ok(Some(bytes.len() + data.len()));
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            Ok::<_, ApiError>(None)
        };
        match tokio::time::timeout(state.body_read_timeout, read).await {
            Ok(Ok(None)) => Ok(RequestBody(bytes.into())),
            Ok(Ok(Some(read))) => {
                tokio::spawn(drain(body, read));
                Err(too_large(limit))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (--body-read-timeout)",
                    state.body_read_timeout.as_secs_f64()
                ),
                None,
                "body_timeout",
            )),
        }
    }
}

/// Reads and drops the rest of an oversized body (`read` bytes of it already seen), within
/// `DRAIN_LIMIT` and `LINGER`; the connection closes cleanly after.
async fn drain(mut body: Body, mut read: usize) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// 415 unless `Content-Type` is `application/json` (parameters such as `charset` allowed).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = given.as_deref().map(|v| v.split(';').next().unwrap_or("").trim());
    if essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    let got = match &given {
        Some(v) => format!("`{v}`"),
        None => "none".to_string(),
    };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("the request body must be JSON with `Content-Type: application/json` (got {got})"),
        None,
        "unsupported_media_type",
    ))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than the server's limit of {limit} bytes (--max-request-body)"),
        None,
        "body_too_large",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_bodies_pass() {
        let mut headers = HeaderMap::new();
        assert_eq!(require_json(&headers).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        for ok in ["application/json", "Application/JSON; charset=utf-8", " application/json ;x=y"] {
            headers.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(require_json(&headers).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp", ""] {
            headers.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            let error = require_json(&headers).unwrap_err();
            assert_eq!((error.status, error.label), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"), "{bad}");
        }
    }
}
