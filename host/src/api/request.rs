//! Request bodies of `/v1/completions` and `/v1/chat/completions`. The generation parameters both
//! share live in `GenerationParams`, flattened into each.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::tokenizer::ChatMessage;

/// `prompt` of a completion request: text, a batch of texts, token ids, or a batch of token-id
/// lists. A batch gives one choice per prompt (times `n`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Parameters common to completions and chat completions. `None` means the default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationParams {
    /// Must name the served model when given.
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's convention: -1 or 0 is no limit.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub n: Option<u64>,
    /// Token id (as a string, OpenAI's shape) to a bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    /// Lower runs sooner (vLLM's convention) under `--scheduling-policy priority`.
    pub priority: Option<i32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// The name of a sampler plugin to sample with.
    pub sampler: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    /// 0..=5 alternatives per token.
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
    #[serde(flatten)]
    pub params: GenerationParams,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<ChatMessage>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    /// 0..=20 alternatives per token; needs `logprobs: true`.
    pub top_logprobs: Option<u32>,
    /// vLLM's extension; default true.
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub params: GenerationParams,
}
