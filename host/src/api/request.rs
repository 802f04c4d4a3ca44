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
    #[serde(flatten)]
    pub unimplemented: Unimplemented,
}

/// Request fields of OpenAI's API and vLLM's that would change the output but are not
/// implemented yet: read only so that a request naming one is refused with a 400 that says so
/// (`Unimplemented::first`), never answered as if it were absent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Unimplemented {
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<serde_json::Value>,
    pub guided_choice: Option<serde_json::Value>,
    pub guided_grammar: Option<serde_json::Value>,
    pub min_tokens: Option<serde_json::Value>,
    pub use_beam_search: Option<serde_json::Value>,
    pub length_penalty: Option<serde_json::Value>,
    pub prompt_logprobs: Option<serde_json::Value>,
    pub allowed_token_ids: Option<serde_json::Value>,
    pub bad_words: Option<serde_json::Value>,
    pub truncate_prompt_tokens: Option<serde_json::Value>,
    pub logits_processors: Option<serde_json::Value>,
}

impl Unimplemented {
    /// The first field given with a value that asks for something (`null`, `false`, `0`, an
    /// empty list, `response_format: {"type": "text"}` and `tool_choice: "none"` ask for nothing),
    /// and what it would need.
    pub fn first(&self) -> Option<(&'static str, &'static str)> {
        use serde_json::Value;
        let asks = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(_) => true,
        };
        let text_format = self.response_format.as_ref().and_then(|f| f.get("type")).and_then(Value::as_str) == Some("text");
        let no_tool = self.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
        let structured = "structured output (JSON schema, regex, choice, grammar) is not implemented yet";
        let tools = "tool calling is not implemented yet";
        let fields: [(&'static str, bool, &'static str); 18] = [
            ("response_format", asks(&self.response_format) && !text_format, structured),
            ("tools", asks(&self.tools), tools),
            ("tool_choice", asks(&self.tool_choice) && !no_tool, tools),
            ("functions", asks(&self.functions), tools),
            ("function_call", asks(&self.function_call), tools),
            ("structured_outputs", asks(&self.structured_outputs), structured),
            ("guided_json", asks(&self.guided_json), structured),
            ("guided_regex", asks(&self.guided_regex), structured),
            ("guided_choice", asks(&self.guided_choice), structured),
            ("guided_grammar", asks(&self.guided_grammar), structured),
            ("min_tokens", asks(&self.min_tokens), "a minimum output length is not implemented"),
            ("use_beam_search", asks(&self.use_beam_search), "beam search is not implemented"),
            ("length_penalty", asks(&self.length_penalty) && self.length_penalty.as_ref().and_then(Value::as_f64) != Some(1.0), "beam search is not implemented"),
            ("prompt_logprobs", asks(&self.prompt_logprobs), "prompt log-probs are not computed"),
            ("allowed_token_ids", asks(&self.allowed_token_ids), "token allow-lists are not implemented"),
            ("bad_words", asks(&self.bad_words), "bad-word lists are not implemented"),
            ("truncate_prompt_tokens", asks(&self.truncate_prompt_tokens), "prompt truncation is not implemented"),
            ("logits_processors", asks(&self.logits_processors), "per-request logits processors are not supported (use a sampler plugin)"),
        ];
        fields.into_iter().find(|(_, asked, _)| *asked).map(|(field, _, why)| (field, why))
    }
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
