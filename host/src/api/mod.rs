//! The OpenAI-compatible wire format (serde types only, no behaviour): what clients send to
//! `/v1/completions`, `/v1/chat/completions`, `/tokenize` and `/detokenize`, and what they get back,
//! streamed or not. Field names and shapes follow OpenAI's API and vLLM's extensions to it.
//!
//! Invariants: request types ignore unknown fields (OpenAI clients send extras) and accept `null`
//! wherever OpenAI does (every optional field is an `Option`); response types serialize `null`
//! where OpenAI writes `null` (e.g. `finish_reason` of a chunk that is not the last) and leave out
//! vLLM-only fields that are absent. Turning a request into an engine request is `validation`'s
//! job; rendering engine events into these types is `server`'s.

mod request;
mod response;
mod tokenize;

pub use self::request::{
    ChatCompletionRequest, CompletionRequest, FieldError, GenerationParams, Prompt, StopSpec, StreamOptions,
};
pub use self::response::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogprob, ChatLogprobs,
    ChatMessageOut, ChatTopLogprob, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse,
    ErrorBody, ErrorDetail, FunctionCallChunk, FunctionCallOut, ModelCard, ModelList, ToolCallChunk, ToolCallOut, UsageInfo,
};
pub use self::tokenize::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};

/// A JSON body that did not parse into a request type: the message and the field it concerns
/// (a dotted path like `messages[0].content`, or `None` for malformed JSON).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub param: Option<String>,
    pub message: String,
}

/// Parses a request body, reporting which field was wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    // Malformed JSON first, so its error does not blame a field.
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ParseError { param: None, message: format!("the request body is not valid JSON: {e}") })?;
    if !value.is_object() {
        return Err(ParseError { param: None, message: "the request body must be a JSON object".into() });
    }
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let mut param = (path != "." && !path.is_empty()).then_some(path);
        if param.is_none() {
            // Errors inside a `#[serde(flatten)]`ed struct lose their path: ask the shared
            // parameters alone, which name the field when it is one of theirs.
            if let Err(inner) = serde_path_to_error::deserialize::<_, GenerationParams>(value) {
                let path = inner.path().to_string();
                param = (path != "." && !path.is_empty()).then_some(path);
            }
        }
        let inner = e.into_inner().to_string();
        let message = match &param {
            Some(p) => format!("`{p}`: {inner}"),
            None => inner,
        };
        ParseError { param, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field() {
        let err = parse_json::<CompletionRequest>(br#"{"prompt": "hi", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"), "{err}");
        let err = parse_json::<ChatCompletionRequest>(br#"{"messages": [], "n": "two"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("n"), "{err}");
        let err = parse_json::<CompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(err.param, None);
        let err = parse_json::<ChatCompletionRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert!(err.param.as_deref().unwrap().starts_with("messages[0]"), "{err:?}");
    }

    #[test]
    fn prompts_in_every_shape_and_unknown_fields() {
        let r: CompletionRequest = parse_json(br#"{"prompt": "hi", "whatever": {"x": 1}, "stop": null}"#).unwrap();
        assert_eq!(r.prompt, Some(Prompt::Text("hi".into())));
        let r: CompletionRequest = parse_json(br#"{"prompt": ["a", "b"]}"#).unwrap();
        assert_eq!(r.prompt, Some(Prompt::Texts(vec!["a".into(), "b".into()])));
        let r: CompletionRequest = parse_json(br#"{"prompt": [1, 2]}"#).unwrap();
        assert_eq!(r.prompt, Some(Prompt::Tokens(vec![1, 2])));
        let r: CompletionRequest = parse_json(br#"{"prompt": [[1], [2, 3]], "stop": "x", "logit_bias": {"5": -1}}"#).unwrap();
        assert_eq!(r.prompt, Some(Prompt::TokenLists(vec![vec![1], vec![2, 3]])));
        assert_eq!(r.params.stop, Some(StopSpec::One("x".into())));
        let r: ChatCompletionRequest = parse_json(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "logprobs": true, "top_logprobs": 2}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.top_logprobs, Some(2));
    }
}
