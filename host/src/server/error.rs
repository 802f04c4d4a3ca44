//! The one place where failures become HTTP responses: every error a handler returns is an
//! `ApiError` (status, OpenAI error body with `param`), built from the subsystem's error enum.
//!
//! Mapping: malformed JSON, invalid or unsupported parameters → 400 (with `param`); a `Host` or
//! `Origin` not allowed → 403; unknown model → 404; a body too slow → 408; body over
//! `--max-request-body` → 413; not `application/json` → 415; engine queue full → 429; engine down
//! → 503 (both with `Retry-After`); anything else from the engine → 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{ErrorBody, ErrorDetail, ParseError};
use crate::engine::EngineError;
use crate::validation::ValidationError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// Stable label for `pagedserve_request_failure_total`.
    pub label: &'static str,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>, param: Option<String>, label: &'static str) -> Self {
        ApiError { status, message: message.into(), param, label }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message, param.map(str::to_string), "invalid_request")
    }

    pub fn model_not_found(name: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, format!("The model `{name}` does not exist."), Some("model".into()), "model_not_found")
    }

    /// OpenAI / vLLM error type names.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::FORBIDDEN => "PermissionDeniedError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeoutError",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaTypeError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind().to_string(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }
}

/// Seconds a client told "busy" (429) or "unavailable" (503) should wait before trying again.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    /// The error body; a 429 or 503 of the server's own also says when to come back
    /// (`Retry-After`). One a filter plugin chose does not: the filter's interface carries no
    /// delay, and its message may name a much longer one (a rate limit's refill) than ours.
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) && self.label != "filter" {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.message, e.param, "invalid_request")
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::bad_request(e.to_string(), Some(e.field()))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            EngineError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            // A request the KV cache can never hold: the client asked for too much.
            EngineError::TooLarge(_) => StatusCode::BAD_REQUEST,
            // A constraint plugin that refused the request's configuration: the client's to fix.
            EngineError::PluginRefused(_) => StatusCode::BAD_REQUEST,
            // A sampler plugin that faulted: the request that chose it fails, naming the plugin.
            EngineError::Forward(_) | EngineError::Detokenize(_) | EngineError::Plugin(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let param = matches!(e, EngineError::PluginRefused(_)).then(|| "constraint".to_string());
        ApiError::new(status, e.to_string(), param, e.label())
    }
}

impl From<crate::plugin::FilterFault> for ApiError {
    /// A filter that faulted fails the request closed, naming the plugin.
    fn from(fault: crate::plugin::FilterFault) -> Self {
        let status = StatusCode::from_u16(fault.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        ApiError::new(status, fault.to_string(), None, "plugin")
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        ApiError::new(rejection.status(), rejection.body_text(), None, "invalid_request")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_unavailable_answers_say_when_to_retry() {
        for (error, retry) in [
            (ApiError::from(EngineError::QueueFull(4)), true),
            (ApiError::from(EngineError::Unavailable), true),
            (ApiError::bad_request("no", Some("prompt")), false),
            (ApiError::from(EngineError::TooLarge("x".into())), false),
        ] {
            let status = error.status;
            let response = error.into_response();
            assert_eq!(response.headers().get(header::RETRY_AFTER).is_some(), retry, "{status}");
        }
    }
}
