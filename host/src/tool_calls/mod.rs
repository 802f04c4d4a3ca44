//! Tool calling for chat completions: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls` (`ToolRequest`); the prompt (the model's own chat template renders the
//! tools, assistant `tool_calls` and `tool` messages where it can, and a plain-text rendering in
//! the model's call format stands in where it cannot, `prepare_messages`); the constraint that
//! makes `required` and named choices call a tool with arguments valid against its schema
//! (`ToolRequest::constraint`); and the parser that turns output back into OpenAI `tool_calls`
//! (`parser`).
//!
//! The call format (`ToolCallFormat`) comes from `--tool-call-parser`, or from the chat template:
//! `<tool_call>` means Hermes / Qwen, `[TOOL_CALLS]` Mistral, `<|python_tag|>` Llama 3.x JSON;
//! a template with no tool support gets the Hermes format, described in the system prompt.

pub mod parser;

use serde_json::{json, Map, Value};

use crate::api::FieldError;
use crate::constraint::{with_json_options, ConstraintSpec};
use crate::tokenizer::{ChatContent, ChatMessage, Tokenizer};

pub use parser::{ParsedDelta, ToolCall, ToolCallDelta, ToolCallParser};

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes, Qwen 2.5 / 3, and the
    /// format given to models whose template has no tools).
    Hermes,
    /// `{"name": ..., "parameters": ...}` as the whole answer (Llama 3.1 - 3.3).
    #[value(name = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": ...}]` (Mistral).
    Mistral,
}

impl ToolCallFormat {
    /// The format a chat template teaches its model.
    pub fn detect(template: Option<&str>) -> Self {
        match template {
            Some(t) if t.contains("[TOOL_CALLS]") => ToolCallFormat::Mistral,
            Some(t) if t.contains("<tool_call>") => ToolCallFormat::Hermes,
            Some(t) if t.contains("<|python_tag|>") || t.contains("\"parameters\": dictionary of argument name") => {
                ToolCallFormat::Llama3Json
            }
            _ => ToolCallFormat::Hermes,
        }
    }

    /// Whether the parser must see special tokens (Mistral's `[TOOL_CALLS]` is one).
    pub fn needs_special_tokens(self) -> bool {
        self == ToolCallFormat::Mistral
    }

    fn arguments_key(self) -> &'static str {
        match self {
            ToolCallFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }

    /// One call as the model would write it (`arguments` is JSON text).
    fn call_text(self, name: &str, arguments: &str) -> String {
        let name = Value::from(name);
        let key = self.arguments_key();
        let object = format!("{{\"name\": {name}, \"{key}\": {arguments}}}");
        match self {
            ToolCallFormat::Hermes => format!("<tool_call>\n{object}\n</tool_call>"),
            _ => object,
        }
    }

    /// Calls of one assistant turn as the model would write them.
    fn calls_text(self, calls: &[(String, String)]) -> String {
        let objects: Vec<String> = calls.iter().map(|(name, args)| self.call_text(name, args)).collect();
        match self {
            ToolCallFormat::Hermes => objects.join("\n"),
            ToolCallFormat::Llama3Json => objects.join("; "),
            ToolCallFormat::Mistral => format!("[TOOL_CALLS][{}]", objects.join(", ")),
        }
    }

    /// The system-prompt text that describes `tools` and this format to a model whose template
    /// cannot render tools.
    fn instructions(self, tools: &[Tool]) -> String {
        let signatures: Vec<String> = tools.iter().map(|t| t.raw.to_string()).collect();
        let signatures = signatures.join("\n");
        match self {
            ToolCallFormat::Hermes => format!(
                "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
                 You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n</tools>\n\n\
                 For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
                 <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
            ),
            ToolCallFormat::Llama3Json => format!(
                "Given the following functions, please respond with a JSON for a function call with its proper arguments \
                 that best answers the given prompt.\n\nRespond in the format {{\"name\": function name, \"parameters\": \
                 dictionary of argument name and its value}}. Do not use variables.\n\n{signatures}"
            ),
            ToolCallFormat::Mistral => format!(
                "You can call these functions:\n{signatures}\n\nTo call functions, answer with [TOOL_CALLS] followed by a JSON \
                 list of {{\"name\": <function-name>, \"arguments\": <args-json-object>}} objects."
            ),
        }
    }
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (an empty object schema when none was given).
    pub parameters: Value,
    /// The tool as the client sent it (`{"type": "function", "function": {...}}`), for templates.
    pub raw: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are context only, output is not parsed.
    None,
    /// The model decides; output is parsed for calls.
    Auto,
    /// At least one call, constrained to the tools' schemas.
    Required,
    /// Exactly one call of this function, constrained to its schema.
    Function(String),
}

/// A chat request's tools.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Whether `required` may make several calls in one answer.
    pub parallel: bool,
}

fn field_error(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError { field, message: message.into() }
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl ToolRequest {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools are given.
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<&Value>) -> Result<Option<Self>, FieldError> {
        let tools = tools.filter(|v| !v.is_null());
        let choice = choice.filter(|v| !v.is_null());
        let parallel = match parallel.filter(|v| !v.is_null()) {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(field_error("parallel_tool_calls", "must be a boolean")),
        };
        let Some(tools) = tools else {
            return match choice {
                None => Ok(None),
                Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                Some(_) => Err(field_error("tool_choice", "needs `tools`")),
            };
        };
        let list = tools.as_array().ok_or_else(|| field_error("tools", "must be a list of tools"))?;
        let mut parsed: Vec<Tool> = Vec::with_capacity(list.len());
        for (i, tool) in list.iter().enumerate() {
            let at = |message: String| field_error("tools", format!("[{i}] {message}"));
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => return Err(at(format!("has type `{other}`; only `function` tools are supported"))),
                None => return Err(at("needs `\"type\": \"function\"`".into())),
            }
            let function = tool.get("function").and_then(Value::as_object).ok_or_else(|| at("needs a `function` object".into()))?;
            let name = function.get("name").and_then(Value::as_str).ok_or_else(|| at("needs `function.name`".into()))?;
            if !valid_name(name) {
                return Err(at(format!("function name `{name}` must be 1-64 letters, digits, `_`, `-` or `.`")));
            }
            if parsed.iter().any(|t| t.name == name) {
                return Err(at(format!("repeats the function name `{name}`")));
            }
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(schema @ Value::Object(_)) => schema.clone(),
                Some(_) => return Err(at("`function.parameters` must be a JSON schema (an object)".into())),
            };
            parsed.push(Tool { name: name.to_string(), parameters, raw: tool.clone() });
        }
        if parsed.is_empty() {
            return Err(field_error("tools", "must not be empty"));
        }
        let choice = match choice {
            None => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => return Err(field_error("tool_choice", format!("must be `none`, `auto`, `required` or a function, got `{other}`"))),
            },
            Some(object @ Value::Object(_)) => {
                let name = object
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| field_error("tool_choice", "must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}"))?;
                if !parsed.iter().any(|t| t.name == name) {
                    return Err(field_error("tool_choice", format!("names `{name}`, which is not among `tools`")));
                }
                ToolChoice::Function(name.to_string())
            }
            Some(_) => return Err(field_error("tool_choice", "must be a string or an object")),
        };
        if choice == ToolChoice::Auto {
            // Strict arguments are enforced by the constraint engine, which `auto` does not use.
            if let Some(i) = list.iter().position(|t| t.pointer("/function/strict") == Some(&Value::Bool(true))) {
                return Err(field_error(
                    "tools",
                    format!("[{i}] `strict: true` is enforced only with `tool_choice` `required` or a named function, not `auto`"),
                ));
            }
        }
        Ok(Some(ToolRequest { tools: parsed, choice, parallel }))
    }

    /// Whether the output is parsed for calls.
    pub fn parses_output(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// Each tool's parameter schema, as a constraint (compiled at validation so that a schema
    /// that is not one is refused).
    pub fn parameter_schemas(&self) -> impl Iterator<Item = ConstraintSpec> + '_ {
        self.tools.iter().map(|t| ConstraintSpec::JsonSchema(t.parameters.clone()))
    }

    /// The grammar that `required` and named choices generate under: one call (or, with
    /// `parallel`, several under `required`) of the allowed tools in `format`, each call's
    /// arguments valid against its schema. `special_marker` is the token id of the format's
    /// marker when the vocabulary has it as one special token (Mistral's `[TOOL_CALLS]`).
    pub fn constraint(&self, format: ToolCallFormat, special_marker: Option<u32>) -> Option<ConstraintSpec> {
        let allowed: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let key = format.arguments_key();
        let alternatives: Vec<Value> = allowed
            .iter()
            .map(|t| {
                let mut properties = Map::new();
                properties.insert("name".into(), json!({"const": t.name}));
                properties.insert(key.into(), t.parameters.clone());
                json!({"type": "object", "properties": properties, "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let schema = with_json_options(if alternatives.len() == 1 { alternatives[0].clone() } else { json!({"anyOf": alternatives}) });
        let many = self.parallel && self.choice == ToolChoice::Required;
        let repeat = |item: &str, separator: &str| if many { format!("{item} ({separator:?} {item})*") } else { item.to_string() };
        let marker = special_marker.map_or_else(|| "\"[TOOL_CALLS]\"".to_string(), |id| format!("<[{id}]>"));
        let start = match format {
            ToolCallFormat::Hermes => repeat("\"<tool_call>\\n\" call \"\\n</tool_call>\"", "\n"),
            ToolCallFormat::Llama3Json => repeat("call", "; "),
            ToolCallFormat::Mistral => format!("{marker} \"[\" {} \"]\"", repeat("call", ", ")),
        };
        Some(ConstraintSpec::Grammar(format!("start: {start}\ncall: %json {schema}\n")))
    }
}

/// What a chat template renders natively, found by rendering probes (`probe`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateSupport {
    /// The `tools` variable.
    pub tools: bool,
    /// Assistant messages' `tool_calls`.
    pub tool_calls: bool,
    /// Messages of role `tool`.
    pub tool_role: bool,
}

impl TemplateSupport {
    /// Renders small conversations with marked names and checks the marks come out.
    pub fn probe(tokenizer: &Tokenizer) -> Self {
        let tool = json!({"type": "function", "function": {"name": "pagedserve_probe_tool", "description": "probe",
                          "parameters": {"type": "object", "properties": {}}}});
        let mut extra = Map::new();
        extra.insert("tools".into(), json!([tool]));
        let user = ChatMessage::new("user", "probe");
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.extra.insert(
            "tool_calls".into(),
            json!([{"id": "call_probe", "type": "function", "function": {"name": "pagedserve_probe_call", "arguments": {}}}]),
        );
        let mut result = ChatMessage::new("tool", "pagedserve_probe_result");
        result.extra.insert("tool_call_id".into(), json!("call_probe"));
        let renders = |messages: &[ChatMessage], extra: Option<&Map<String, Value>>, mark: &str| {
            tokenizer.apply_chat_template_with(messages, true, extra).is_ok_and(|text| text.contains(mark))
        };
        TemplateSupport {
            tools: renders(std::slice::from_ref(&user), Some(&extra), "pagedserve_probe_tool"),
            tool_calls: renders(&[user.clone(), assistant.clone()], Some(&extra), "pagedserve_probe_call"),
            tool_role: renders(&[user, assistant, result], Some(&extra), "pagedserve_probe_result"),
        }
    }
}

/// The text of a message's content (list parts joined).
fn content_text(content: &ChatContent) -> String {
    match content {
        ChatContent::Text(text) => text.clone(),
        ChatContent::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join(""),
        ChatContent::Null => String::new(),
    }
}

/// An assistant message's `tool_calls` as (name, arguments JSON text).
fn history_calls(calls: &Value) -> Result<Vec<(String, String)>, String> {
    let list = calls.as_array().ok_or("`tool_calls` must be a list")?;
    list.iter()
        .map(|call| {
            let function = call.get("function").ok_or("a tool call needs `function`")?;
            let name = function.get("name").and_then(Value::as_str).ok_or("a tool call needs `function.name`")?;
            let arguments = match function.get("arguments") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(text)) => {
                    serde_json::from_str::<Value>(text).map_err(|_| format!("the arguments of `{name}` are not JSON"))?;
                    text.clone()
                }
                Some(other) => other.to_string(),
            };
            Ok((name.to_string(), arguments))
        })
        .collect()
}

/// The messages and template variables to render for a chat request with `tools` (or a history
/// with tool calls): what the template supports is passed to it (tool-call arguments as objects,
/// as Hugging Face templates expect); the rest is written as the model's format would, tools in
/// the system prompt and tool results as user turns in `<tool_response>` tags.
pub fn prepare_messages(
    messages: &[ChatMessage],
    tools: Option<&ToolRequest>,
    support: TemplateSupport,
    format: ToolCallFormat,
) -> Result<(Vec<ChatMessage>, Option<Map<String, Value>>), FieldError> {
    // A template that cannot show the tools gets the whole conversation in one written form.
    let native = support.tools;
    let (native_calls, native_role) = (native && support.tool_calls, native && support.tool_role);
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for (i, message) in messages.iter().enumerate() {
        let mut message = message.clone();
        if let Some(calls) = message.extra.get("tool_calls").filter(|v| !v.is_null()).cloned() {
            let parsed = history_calls(&calls).map_err(|e| field_error("messages", format!("[{i}] {e}")))?;
            if native_calls {
                let objects: Vec<Value> = calls
                    .as_array()
                    .into_iter()
                    .flatten()
                    .zip(&parsed)
                    .map(|(call, (_, args))| {
                        let mut call = call.clone();
                        call["function"]["arguments"] = serde_json::from_str(args).unwrap_or(Value::Null);
                        call
                    })
                    .collect();
                message.extra.insert("tool_calls".into(), Value::Array(objects));
            } else {
                message.extra.remove("tool_calls");
                let mut text = content_text(&message.content);
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format.calls_text(&parsed));
                message.content = ChatContent::Text(text);
            }
        }
        if message.role == "tool" && !native_role {
            let wrapped = format!("<tool_response>\n{}\n</tool_response>", content_text(&message.content));
            // Consecutive results share one user turn.
            match out.last_mut() {
                Some(last) if last.role == "user" && last.extra.contains_key("pagedserve_tool_results") => {
                    let text = format!("{}\n{wrapped}", content_text(&last.content));
                    last.content = ChatContent::Text(text);
                }
                _ => {
                    let mut turn = ChatMessage::new("user", wrapped);
                    turn.extra.insert("pagedserve_tool_results".into(), Value::Bool(true));
                    out.push(turn);
                }
            }
            continue;
        }
        if message.content == ChatContent::Null && !native_calls {
            message.content = ChatContent::Text(String::new());
        }
        out.push(message);
    }
    for message in &mut out {
        message.extra.remove("pagedserve_tool_results");
    }
    let Some(tools) = tools else { return Ok((out, None)) };
    if native {
        let mut extra = Map::new();
        extra.insert("tools".into(), Value::Array(tools.tools.iter().map(|t| t.raw.clone()).collect()));
        return Ok((out, Some(extra)));
    }
    let instructions = format.instructions(&tools.tools);
    match out.first_mut() {
        Some(first) if first.role == "system" => {
            let text = format!("{}\n\n{instructions}", content_text(&first.content));
            first.content = ChatContent::Text(text);
        }
        _ => out.insert(0, ChatMessage::new("system", instructions)),
    }
    Ok((out, None))
}

#[cfg(test)]
mod tests;
