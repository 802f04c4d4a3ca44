//! The one place where failures become HTTP responses: every error a handler returns is an
//! `ApiError` (status, OpenAI error body with `param`), built from the subsystem's error enum.
//!
//! Mapping: malformed JSON, invalid or unsupported parameters → 400 (with `param`); unknown model
//! → 404; body over `--max-request-body` → 413; engine queue full → 429; engine down → 503;
//! anything else from the engine → 500.

use axum::http::StatusCode;
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
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
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
