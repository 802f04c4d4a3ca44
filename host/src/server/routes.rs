//! The small routes: health, metrics, model list, tokenize and detokenize, and the answers to
//! unknown paths and methods.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::body::RequestBody;
use super::error::ApiError;
use super::AppState;
use crate::api::{self, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse};

/// 200 while the engine runs and its last forward pass succeeded; 503 (saying why) otherwise.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.unhealthy() {
        None => StatusCode::OK.into_response(),
        Some(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why, None, "unavailable").into_response(),
    }
}

/// Any path no route serves: an OpenAI-style 404, not an empty body.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route for {}", uri.path()), None, "invalid_request")
}

/// A known path asked with a method it does not take: an OpenAI-style 405.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}", uri.path()), None, "invalid_request")
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "pagedserve".into(),
            root: state.model_root.clone(),
            max_model_len: state.validator.max_model_len(),
        }],
    })
}

/// `/tokenize`: parsing and tokenizing on the bounded pool (`AppState::run_blocking`).
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: RequestBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.run_blocking(move |state| tokenize_body(state, &body.0)).await?.map(Json)
}

fn tokenize_body(state: &AppState, body: &[u8]) -> Result<TokenizeResponse, ApiError> {
    let request: TokenizeRequest = api::parse_json(body)?;
    let v = &state.validator;
    let (tokens, model, return_strs) = match request {
        TokenizeRequest::Chat { messages, model, add_generation_prompt, add_special_tokens, return_token_strs, tools } => {
            // The tools count as the chat request's do: written into the prompt by the template.
            let tools = crate::tool_calls::ToolRequest::parse(tools.as_ref(), None, None)
                .map_err(|e| ApiError::bad_request(e.message, Some(e.field)))?;
            let mut tokens = v.encode_chat_with(&messages, add_generation_prompt.unwrap_or(true), tools.as_ref())?;
            if add_special_tokens.unwrap_or(false) {
                if let Some(bos) = state.tokenizer.bos_token_id().filter(|_| state.tokenizer.add_bos_token()) {
                    tokens.insert(0, bos);
                }
            }
            (tokens, model, return_token_strs)
        }
        TokenizeRequest::Completion { prompt, model, add_special_tokens, return_token_strs } => {
            (v.encode_with(&prompt, add_special_tokens.unwrap_or(true))?, model, return_token_strs)
        }
    };
    state.check_model(model.as_deref())?;
    let token_strs = return_strs
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&t| state.tokenizer.id_to_token(t).unwrap_or_default()).collect());
    Ok(TokenizeResponse { count: tokens.len(), max_model_len: v.max_model_len(), tokens, token_strs })
}

/// `/detokenize`, on the bounded pool like `/tokenize`.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: RequestBody,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    state.run_blocking(move |state| detokenize_body(state, &body.0)).await?.map(Json)
}

fn detokenize_body(state: &AppState, body: &[u8]) -> Result<DetokenizeResponse, ApiError> {
    let request: DetokenizeRequest = api::parse_json(body)?;
    state.check_model(request.model.as_deref())?;
    state.validator.check_ids("tokens", &request.tokens)?;
    let prompt = state
        .tokenizer
        .decode(&request.tokens, false)
        .map_err(|e| ApiError::bad_request(format!("`tokens`: {e}"), Some("tokens")))?;
    Ok(DetokenizeResponse { prompt })
}
