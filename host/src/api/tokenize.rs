//! `/tokenize` and `/detokenize` in vLLM's shapes.

use serde::{Deserialize, Serialize};

use crate::tokenizer::ChatMessage;

/// Either `{"prompt": ..., "add_special_tokens": ...}` or `{"messages": [...], ...}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenizeRequest {
    Chat {
        messages: Vec<ChatMessage>,
        model: Option<String>,
        /// Default true.
        add_generation_prompt: Option<bool>,
        /// Default false: the chat template writes the special tokens.
        add_special_tokens: Option<bool>,
        return_token_strs: Option<bool>,
        /// As chat completions take them: the tools the template writes into the prompt.
        tools: Option<serde_json::Value>,
    },
    Completion {
        prompt: String,
        model: Option<String>,
        /// Default true.
        add_special_tokens: Option<bool>,
        return_token_strs: Option<bool>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}
