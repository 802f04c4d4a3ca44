//! Request bodies of `/v1/completions` and `/v1/chat/completions`. The generation parameters both
//! share live in `GenerationParams`, flattened into each.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::constraint::ConstraintSpec;
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
    /// vLLM's usage in every chunk: refused when asked for (not implemented).
    pub continuous_usage_stats: Option<bool>,
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
    /// A constraint plugin that decides which tokens may come next: its name, or
    /// `{"name": ..., "config": any JSON}`.
    pub constraint: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: ExtraFields,
}

/// Request fields of OpenAI's API and vLLM's beyond sampling: the structured-output ones
/// (`constraint`), and those that would change the output but are not implemented yet, read
/// only so that a request naming one is refused with a 400 that says so (`unimplemented`), never
/// answered as if it were absent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ExtraFields {
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<serde_json::Value>,
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
    pub chat_template: Option<serde_json::Value>,
    pub chat_template_kwargs: Option<serde_json::Value>,
    pub continue_final_message: Option<serde_json::Value>,
    pub guided_whitespace_pattern: Option<serde_json::Value>,
    pub audio: Option<serde_json::Value>,
    /// Chat's `echo` (vLLM: the reply starts with the last message when it has the reply's
    /// role). Completions parse their own `echo` before this struct sees the request.
    pub echo: Option<serde_json::Value>,
    /// vLLM's spaces between special tokens in the text (none are put in: only `false` is what
    /// the detokenizer does).
    pub spaces_between_special_tokens: Option<serde_json::Value>,
}

/// A field's value that does not say what it should.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl ExtraFields {
    /// What the output must match, from `response_format` (OpenAI's `json_object` and
    /// `json_schema`), `structured_outputs` (vLLM's `json`, `regex`, `choice`, `grammar`,
    /// `json_object`) or vLLM's older `guided_json`, `guided_regex`, `guided_choice`,
    /// `guided_grammar`; at most one of them. Returns the field it came from.
    pub fn constraint(&self) -> Result<Option<(&'static str, ConstraintSpec)>, FieldError> {
        use serde_json::Value;
        let err = |field: &'static str, message: &str| FieldError { field, message: message.to_string() };
        let mut found: Vec<(&'static str, ConstraintSpec)> = Vec::new();
        if let Some(format) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            match format.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => found.push(("response_format", ConstraintSpec::JsonObject)),
                Some("json_schema") => {
                    let schema = format
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .ok_or_else(|| err("response_format", "of type json_schema needs `json_schema.schema`"))?;
                    found.push(("response_format", ConstraintSpec::JsonSchema(schema.clone())));
                }
                _ => return Err(err("response_format", "`type` must be `text`, `json_object` or `json_schema`")),
            }
        }
        let string = |field: &'static str, v: &Value| v.as_str().map(str::to_string).ok_or_else(|| err(field, "must be a string"));
        let choices = |field: &'static str, v: &Value| -> Result<Vec<String>, FieldError> {
            let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| err(field, "must be a non-empty list of strings"))?;
            list.iter().map(|c| string(field, c)).collect()
        };
        if let Some(so) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) {
            let field = "structured_outputs";
            let object = so.as_object().ok_or_else(|| err(field, "must be an object"))?;
            for (key, value) in object.iter().filter(|(_, v)| !v.is_null() && **v != Value::Bool(false)) {
                let spec = match key.as_str() {
                    "json" => ConstraintSpec::JsonSchema(match value {
                        Value::String(s) => serde_json::from_str(s).map_err(|e| err(field, &format!("`json` is not JSON: {e}")))?,
                        other => other.clone(),
                    }),
                    "json_object" => ConstraintSpec::JsonObject,
                    "regex" => ConstraintSpec::Regex(string(field, value)?),
                    "choice" => ConstraintSpec::Choice(choices(field, value)?),
                    "grammar" => ConstraintSpec::Grammar(string(field, value)?),
                    "disable_any_whitespace" | "disable_additional_properties" | "whitespace_pattern" => {
                        return Err(err(field, &format!("`{key}` is not supported")))
                    }
                    other => return Err(err(field, &format!("unknown key `{other}`"))),
                };
                found.push((field, spec));
            }
        }
        if let Some(v) = self.guided_json.as_ref().filter(|v| !v.is_null()) {
            let schema = match v {
                Value::String(s) => serde_json::from_str(s).map_err(|e| err("guided_json", &format!("is not JSON: {e}")))?,
                other => other.clone(),
            };
            found.push(("guided_json", ConstraintSpec::JsonSchema(schema)));
        }
        if let Some(v) = self.guided_regex.as_ref().filter(|v| !v.is_null()) {
            found.push(("guided_regex", ConstraintSpec::Regex(string("guided_regex", v)?)));
        }
        if let Some(v) = self.guided_choice.as_ref().filter(|v| !v.is_null()) {
            found.push(("guided_choice", ConstraintSpec::Choice(choices("guided_choice", v)?)));
        }
        if let Some(v) = self.guided_grammar.as_ref().filter(|v| !v.is_null()) {
            found.push(("guided_grammar", ConstraintSpec::Grammar(string("guided_grammar", v)?)));
        }
        match found.len() {
            0 | 1 => Ok(found.pop()),
            _ => Err(err(found[1].0, &format!("conflicts with `{}`: give one structured-output constraint", found[0].0))),
        }
    }

    /// The first field given with a value that asks for something not implemented (`null`,
    /// `false`, `0`, an empty list and `tool_choice: "none"` ask for nothing), and what it would
    /// need. Tools are implemented for chat only (`chat`).
    pub fn unimplemented(&self, chat: bool) -> Option<(&'static str, &'static str)> {
        use serde_json::Value;
        let asks = |v: &Option<Value>| match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(_) => true,
        };
        let no_tool = self.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
        let tools = "tools are for /v1/chat/completions";
        let functions = "the deprecated `functions` API is not supported; send `tools`";
        let fields: [(&'static str, bool, &'static str); 20] = [
            ("tools", !chat && asks(&self.tools), tools),
            ("tool_choice", !chat && asks(&self.tool_choice) && !no_tool, tools),
            ("parallel_tool_calls", !chat && asks(&self.parallel_tool_calls), tools),
            ("functions", asks(&self.functions), functions),
            ("function_call", asks(&self.function_call), functions),
            ("min_tokens", asks(&self.min_tokens), "a minimum output length is not implemented"),
            ("use_beam_search", asks(&self.use_beam_search), "beam search is not implemented"),
            ("length_penalty", asks(&self.length_penalty) && self.length_penalty.as_ref().and_then(Value::as_f64) != Some(1.0), "beam search is not implemented"),
            ("prompt_logprobs", asks(&self.prompt_logprobs), "prompt log-probs are not computed"),
            ("allowed_token_ids", asks(&self.allowed_token_ids), "token allow-lists are not implemented"),
            ("bad_words", asks(&self.bad_words), "bad-word lists are not implemented"),
            ("truncate_prompt_tokens", asks(&self.truncate_prompt_tokens), "prompt truncation is not implemented"),
            ("logits_processors", asks(&self.logits_processors), "per-request logits processors are not supported (use a sampler plugin)"),
            ("chat_template", asks(&self.chat_template), "a per-request chat template is not supported (the model's own is used)"),
            ("chat_template_kwargs", asks(&self.chat_template_kwargs), "chat template arguments are not supported"),
            ("continue_final_message", asks(&self.continue_final_message), "continuing the final message is not implemented"),
            ("guided_whitespace_pattern", asks(&self.guided_whitespace_pattern), "a custom JSON whitespace pattern is not supported"),
            ("audio", asks(&self.audio), "audio output is not supported"),
            ("echo", chat && asks(&self.echo), "echoing the last message in a chat reply is not implemented"),
            ("spaces_between_special_tokens", asks(&self.spaces_between_special_tokens), "special tokens are written without spaces between them (only `false`)"),
        ];
        fields.into_iter().find(|(_, asked, _)| *asked).map(|(field, _, why)| (field, why))
    }
}

impl GenerationParams {
    /// The constraint plugin a request names, and its configuration as text (a JSON string
    /// gives its content; "" when there is none).
    pub fn constraint_plugin(&self) -> Result<Option<(String, String)>, FieldError> {
        use serde_json::Value;
        let err = |message: &str| FieldError { field: "constraint", message: message.to_string() };
        let (name, config) = match self.constraint.as_ref() {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(name)) => (name.as_str(), None),
            Some(Value::Object(object)) => {
                let name = object.get("name").and_then(Value::as_str).ok_or_else(|| err("needs a `name`"))?;
                if let Some(key) = object.keys().find(|k| *k != "name" && *k != "config") {
                    return Err(err(&format!("has an unknown key `{key}` (only `name` and `config`)")));
                }
                (name, object.get("config"))
            }
            Some(_) => return Err(err("must be a plugin name or {\"name\": ..., \"config\": ...}")),
        };
        let config = match config {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        };
        Ok(Some((name.to_string(), config)))
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
