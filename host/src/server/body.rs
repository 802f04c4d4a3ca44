//! The request-body extractor of every POST route: a body whose declared `Content-Length` is over
//! `--max-request-body` is refused with 413 before any of it is read; a body that turns out
//! larger while streaming in (chunked) is cut at the limit by `DefaultBodyLimit`, also 413.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};

use super::error::ApiError;
use super::AppState;

pub struct RequestBody(pub Bytes);

impl FromRequest<Arc<AppState>> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > state.max_request_body as u64) {
            return Err(too_large(state.max_request_body));
        }
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(RequestBody(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large(state.max_request_body)),
            Err(rejection) => Err(rejection.into()),
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than the server's limit of {limit} bytes (--max-request-body)"),
        None,
        "body_too_large",
    )
}
