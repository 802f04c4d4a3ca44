//! Model output → OpenAI tool calls, incrementally: text goes in as it is generated, and out come
//! content deltas and tool-call deltas (a call's id and name once its name is complete, then its
//! arguments as they are written). The non-streamed answer feeds the whole text through the same
//! parser, so streamed deltas always reassemble to the non-streamed call.
//!
//! Formats (`ToolCallFormat`):
//! - Hermes / Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated;
//!   text before the first call is content.
//! - Llama 3.x JSON: the whole output is `{"name": ..., "parameters": {...}}` (optionally after
//!   `<|python_tag|>`, several joined by `;`); output that does not start with `{` is content.
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
//!   `[TOOL_CALLS]name[ARGS]{...}`; text before the marker is content.
//!
//! A call object is scanned as JSON as it arrives: the `name` string, then the raw text of
//! `arguments` (or `parameters`), which becomes the OpenAI `function.arguments` string as written
//! (a JSON-encoded string value is decoded first). Keys may come in either order: arguments seen
//! before the name are held until the name is known.

use super::ToolCallFormat;

/// One piece of a tool call, in OpenAI's streaming shape: the first piece of call `index` carries
/// its `id` and `name`; later pieces carry more of `arguments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// What one `push` (or `finish`) produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedDelta {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

/// A complete tool call (`function.arguments` is the JSON text of the arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Llama 3 JSON only: before the first non-blank character, which decides content or calls.
    Start,
    /// Plain text, watching for the format's start marker.
    Content,
    /// Between call objects: blanks and the format's punctuation are skipped.
    Calls,
    /// Inside a call object.
    Object(ObjectScan),
    /// Mistral's newer form: reading a function name up to `[ARGS]`.
    MistralName(String),
    /// The most calls allowed were made (`parallel_tool_calls: false`): the rest is dropped.
    Done,
}

/// Where the scan of a call object's top level stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Top {
    /// Before the opening `{`.
    Open,
    ExpectKey,
    InKey { key: String, escaped: bool },
    ExpectColon(String),
    ExpectValue(String),
    InValue { key: String, kind: ValueKind },
    AfterValue,
}

/// A value being read at the top level of a call object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ValueKind {
    /// A string: done at its closing quote.
    Text { escaped: bool },
    /// An object or array: done when its brackets balance.
    Nested(Nesting),
    /// A number or literal: done at a blank, `,` or `}`.
    Bare,
}

/// Bracket depth inside a nested value, string-aware.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Nesting {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Nesting {
    /// Consumes `c`; returns true when the brackets balance.
    fn push(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// The scan of one call object: `{"name": ..., "arguments": ...}`, or, in Mistral's `[ARGS]`
/// form, an object that is the arguments of a name already read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectScan {
    /// The object's text so far (checked as JSON when it closes).
    text: String,
    top: Top,
    /// Mistral's `[ARGS]` form: the whole object is the arguments.
    args_only: Option<Nesting>,
    name: Option<String>,
    /// The value being read (for `name`).
    value: String,
    /// The arguments' raw text so far, and whether they are a JSON string (decoded when done).
    arguments: String,
    arguments_is_string: bool,
    arguments_done: bool,
    /// How much of `arguments` has been sent.
    sent: usize,
}

fn is_arguments_key(key: &str) -> bool {
    key == "arguments" || key == "parameters"
}

impl ObjectScan {
    fn new() -> Self {
        ObjectScan {
            text: String::new(),
            top: Top::Open,
            args_only: None,
            name: None,
            value: String::new(),
            arguments: String::new(),
            arguments_is_string: false,
            arguments_done: false,
            sent: 0,
        }
    }

    fn arguments_of(name: String) -> Self {
        ObjectScan { args_only: Some(Nesting::default()), name: Some(name), ..ObjectScan::new() }
    }

    /// Consumes one character; returns true when the object has closed.
    fn push(&mut self, c: char) -> bool {
        self.text.push(c);
        if let Some(nesting) = &mut self.args_only {
            self.arguments.push(c);
            let closed = nesting.push(c);
            self.arguments_done = closed;
            return closed;
        }
        match std::mem::replace(&mut self.top, Top::AfterValue) {
            Top::Open => self.top = if c == '{' { Top::ExpectKey } else { Top::Open },
            Top::ExpectKey => match c {
                '"' => self.top = Top::InKey { key: String::new(), escaped: false },
                '}' => return true,
                _ => self.top = Top::ExpectKey,
            },
            Top::InKey { mut key, escaped } => {
                self.top = match (escaped, c) {
                    (false, '"') => Top::ExpectColon(key),
                    (false, '\\') => Top::InKey { key, escaped: true },
                    _ => {
                        key.push(c);
                        Top::InKey { key, escaped: false }
                    }
                }
            }
            Top::ExpectColon(key) => self.top = if c == ':' { Top::ExpectValue(key) } else { Top::ExpectColon(key) },
            Top::ExpectValue(key) => {
                if c.is_whitespace() {
                    self.top = Top::ExpectValue(key);
                    return false;
                }
                let kind = match c {
                    '"' => ValueKind::Text { escaped: false },
                    '{' | '[' => ValueKind::Nested(Nesting { depth: 1, ..Nesting::default() }),
                    _ => ValueKind::Bare,
                };
                self.value.clear();
                if is_arguments_key(&key) {
                    self.arguments.clear();
                    self.arguments_is_string = c == '"';
                }
                self.top = Top::InValue { key, kind };
                self.take_value_char(c);
            }
            Top::InValue { key, kind } => {
                let (kind, included, done) = match kind {
                    ValueKind::Text { escaped } => match (escaped, c) {
                        (false, '"') => (ValueKind::Text { escaped: false }, true, true),
                        (false, '\\') => (ValueKind::Text { escaped: true }, true, false),
                        _ => (ValueKind::Text { escaped: false }, true, false),
                    },
                    ValueKind::Nested(mut nesting) => {
                        let done = nesting.push(c);
                        (ValueKind::Nested(nesting), true, done)
                    }
                    ValueKind::Bare => {
                        let ends = c.is_whitespace() || c == ',' || c == '}';
                        (ValueKind::Bare, !ends, ends)
                    }
                };
                self.top = Top::InValue { key: key.clone(), kind };
                if included {
                    self.take_value_char(c);
                }
                if done {
                    self.end_value(&key);
                    self.top = Top::AfterValue;
                    if !included {
                        // The delimiter that ended a bare value belongs to the top level.
                        return self.after_value(c);
                    }
                }
            }
            Top::AfterValue => return self.after_value(c),
        }
        false
    }

    fn after_value(&mut self, c: char) -> bool {
        match c {
            ',' => self.top = Top::ExpectKey,
            '}' => return true,
            _ => self.top = Top::AfterValue,
        }
        false
    }

    fn take_value_char(&mut self, c: char) {
        if let Top::InValue { key, .. } = &self.top {
            if is_arguments_key(key) {
                self.arguments.push(c);
            } else {
                self.value.push(c);
            }
        }
    }

    fn end_value(&mut self, key: &str) {
        if key == "name" {
            self.name = serde_json::from_str::<String>(&self.value).ok();
        } else if is_arguments_key(key) {
            self.arguments_done = true;
        }
    }

    /// Arguments text ready to send: what is new once a name is known, except a JSON-string
    /// value, which is sent decoded when complete.
    fn take_arguments(&mut self) -> Option<String> {
        self.name.as_ref()?;
        if self.arguments_is_string {
            if !self.arguments_done || self.sent > 0 {
                return None;
            }
            self.sent = self.arguments.len();
            return Some(self.final_arguments());
        }
        let new = self.arguments[self.sent..].to_string();
        self.sent = self.arguments.len();
        (!new.is_empty()).then_some(new)
    }

    /// The arguments as the OpenAI string: `{}` when none were written.
    fn final_arguments(&self) -> String {
        if self.arguments.is_empty() {
            "{}".to_string()
        } else if self.arguments_is_string {
            serde_json::from_str::<String>(&self.arguments).unwrap_or_else(|_| self.arguments.clone())
        } else {
            self.arguments.clone()
        }
    }
}

/// Incremental parser of one choice's output.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    phase: Phase,
    /// Text received but not yet consumed (a possible marker's beginning).
    pending: String,
    /// Calls found so far, and whether each object was valid JSON with a name.
    calls: Vec<ToolCall>,
    valid: bool,
    /// The id of the call being scanned once its header was sent.
    current_id: Option<String>,
    /// All text received, for the fallback when a call turns out invalid.
    received: String,
    /// Where in `received` the call markup began (the first start marker or object): released
    /// as content at the end if no call came of it.
    calls_from: Option<usize>,
    /// Calls after this many are dropped.
    max_calls: usize,
}

/// A start marker and the punctuation skipped between calls.
fn markers(format: ToolCallFormat) -> (&'static str, &'static [&'static str]) {
    match format {
        ToolCallFormat::Hermes => ("<tool_call>", &["<tool_call>", "</tool_call>"]),
        ToolCallFormat::Llama3Json => ("<|python_tag|>", &[";", "<|python_tag|>"]),
        ToolCallFormat::Mistral => ("[TOOL_CALLS]", &["[TOOL_CALLS]", "[", ",", "]"]),
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

impl ToolCallParser {
    pub fn new(format: ToolCallFormat) -> Self {
        let phase = if format == ToolCallFormat::Llama3Json { Phase::Start } else { Phase::Content };
        ToolCallParser {
            format,
            phase,
            pending: String::new(),
            calls: Vec::new(),
            valid: true,
            current_id: None,
            received: String::new(),
            calls_from: None,
            max_calls: usize::MAX,
        }
    }

    /// Keeps only the first call (`parallel_tool_calls: false`): whatever follows it is dropped.
    pub fn single_call(mut self) -> Self {
        self.max_calls = 1;
        self
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> ParsedDelta {
        self.received.push_str(text);
        self.pending.push_str(text);
        let mut out = ParsedDelta::default();
        self.advance(&mut out, false);
        out
    }

    /// Ends the output: held-back text is released. A call cut off (max_tokens) is dropped; the
    /// calls before it stand. Markup that no call came of (a start marker and nothing complete
    /// after it) was text after all, and goes out as content, streamed or not alike.
    pub fn finish(&mut self) -> ParsedDelta {
        let mut out = ParsedDelta::default();
        self.advance(&mut out, true);
        if self.calls.is_empty() && self.current_id.is_none() {
            if let Some(from) = self.calls_from.take() {
                out.content.push_str(&self.received[from..]);
                self.pending.clear();
                self.phase = Phase::Done;
            }
        }
        out
    }

    /// The complete calls found, when every complete call object was valid.
    pub fn calls(&self) -> Option<&[ToolCall]> {
        (self.valid && !self.calls.is_empty()).then_some(&self.calls[..])
    }

    /// Whether a call object was complete but malformed (not JSON, no name, arguments not JSON):
    /// the non-streamed answer then returns the whole output as text.
    pub fn malformed(&self) -> bool {
        !self.valid
    }

    /// Whether any call has begun (its header sent).
    pub fn started_calls(&self) -> bool {
        !self.calls.is_empty() || self.current_id.is_some()
    }

    /// Everything received, for the non-streamed fallback when the calls are not valid.
    pub fn text(&self) -> &str {
        &self.received
    }

    fn advance(&mut self, out: &mut ParsedDelta, at_end: bool) {
        let (start_marker, punctuation) = markers(self.format);
        loop {
            match &mut self.phase {
                Phase::Start => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.is_empty() {
                        if at_end {
                            out.content.push_str(&std::mem::take(&mut self.pending));
                        }
                        return;
                    }
                    if trimmed.starts_with('{') || trimmed.starts_with(start_marker) {
                        self.pending = trimmed.to_string();
                        self.calls_from.get_or_insert(self.received.len() - self.pending.len());
                        self.phase = Phase::Calls;
                    } else if start_marker.starts_with(trimmed) && !at_end {
                        return;
                    } else {
                        self.phase = Phase::Content;
                    }
                }
                Phase::Content => {
                    if self.format == ToolCallFormat::Llama3Json {
                        out.content.push_str(&std::mem::take(&mut self.pending));
                        return;
                    }
                    if let Some(at) = self.pending.find(start_marker) {
                        out.content.push_str(&self.pending[..at]);
                        self.calls_from.get_or_insert(self.received.len() - self.pending.len() + at);
                        self.pending.drain(..at + start_marker.len());
                        self.phase = Phase::Calls;
                        continue;
                    }
                    let keep = if at_end { 0 } else { partial_suffix(&self.pending, start_marker) };
                    let emit = self.pending.len() - keep;
                    out.content.push_str(&self.pending[..emit]);
                    self.pending.drain(..emit);
                    return;
                }
                Phase::Done => {
                    self.pending.clear();
                    return;
                }
                Phase::Calls => {
                    if self.calls.len() >= self.max_calls {
                        self.phase = Phase::Done;
                        continue;
                    }
                    let trimmed_len = self.pending.len() - self.pending.trim_start().len();
                    self.pending.drain(..trimmed_len);
                    if self.pending.is_empty() {
                        return;
                    }
                    if self.pending.starts_with('{') {
                        self.phase = Phase::Object(ObjectScan::new());
                        continue;
                    }
                    // A longer mark this text may still become (`[TOOL_CALLS]` against `[`) waits.
                    let longer = |p: &&&str| p.len() > self.pending.len() && p.starts_with(self.pending.as_str());
                    if !at_end && punctuation.iter().any(|p| longer(&p)) {
                        return;
                    }
                    if let Some(p) = punctuation.iter().filter(|p| self.pending.starts_with(**p)).max_by_key(|p| p.len()) {
                        self.pending.drain(..p.len());
                        continue;
                    }
                    // A marker cut off by the end of the output (`</tool_call`) is not text.
                    if at_end && punctuation.iter().any(|p| longer(&p)) {
                        self.pending.clear();
                        return;
                    }
                    if self.format == ToolCallFormat::Mistral && self.pending.starts_with(|c: char| c.is_alphabetic() || c == '_') {
                        self.phase = Phase::MistralName(String::new());
                        continue;
                    }
                    // Anything else after the calls is plain text.
                    out.content.push_str(&std::mem::take(&mut self.pending));
                    self.phase = Phase::Content;
                    if self.format == ToolCallFormat::Llama3Json {
                        return;
                    }
                }
                Phase::MistralName(name) => {
                    const ARGS: &str = "[ARGS]";
                    name.push_str(&std::mem::take(&mut self.pending));
                    if let Some(at) = name.find(ARGS) {
                        let rest = name[at + ARGS.len()..].trim_start().to_string();
                        let function = name[..at].trim().to_string();
                        self.pending = rest;
                        self.phase = Phase::Object(ObjectScan::arguments_of(function));
                        continue;
                    }
                    return;
                }
                Phase::Object(scan) => {
                    let mut consumed = 0;
                    let mut closed = false;
                    for c in self.pending.chars() {
                        consumed += c.len_utf8();
                        if scan.push(c) {
                            closed = true;
                            break;
                        }
                    }
                    self.pending.drain(..consumed);
                    // The header goes out once the name is known; arguments follow.
                    if self.current_id.is_none() {
                        if let Some(name) = scan.name.clone() {
                            let id = new_id(self.format);
                            self.current_id = Some(id.clone());
                            out.calls.push(ToolCallDelta { index: self.calls.len(), id: Some(id), name: Some(name), arguments: String::new() });
                        }
                    }
                    if self.current_id.is_some() {
                        if let Some(more) = scan.take_arguments() {
                            push_arguments(out, self.calls.len(), more);
                        }
                    }
                    if !closed {
                        return;
                    }
                    let Phase::Object(scan) = std::mem::replace(&mut self.phase, Phase::Calls) else { unreachable!() };
                    let object_ok = scan.args_only.is_some() || serde_json::from_str::<serde_json::Value>(&scan.text).is_ok();
                    match (scan.name.clone(), self.current_id.take()) {
                        (Some(name), Some(id)) if object_ok => {
                            if scan.arguments.is_empty() {
                                push_arguments(out, self.calls.len(), "{}".to_string());
                            }
                            let arguments = scan.final_arguments();
                            self.valid &= serde_json::from_str::<serde_json::Value>(&arguments).is_ok();
                            self.calls.push(ToolCall { id, name, arguments });
                        }
                        _ => self.valid = false,
                    }
                }
            }
        }
    }
}

/// A fresh call id: `call_` and 24 alphanumerics, or the nine alphanumerics Mistral's templates
/// require.
fn new_id(format: ToolCallFormat) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    let mut rng = rand::rng();
    match format {
        ToolCallFormat::Mistral => Alphanumeric.sample_string(&mut rng, 9),
        _ => format!("call_{}", Alphanumeric.sample_string(&mut rng, 24)),
    }
}

/// Appends arguments text to call `index`'s delta in `out` (one delta per call per push).
fn push_arguments(out: &mut ParsedDelta, index: usize, more: String) {
    match out.calls.last_mut() {
        Some(last) if last.index == index => last.arguments.push_str(&more),
        _ => out.calls.push(ToolCallDelta { index, id: None, name: None, arguments: more }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` characters; returns the content and the calls
    /// reassembled from the deltas (id, name, arguments), and checks each call's first delta
    /// carries its id and name.
    fn stream(format: ToolCallFormat, text: &str, step: usize) -> (String, Vec<(String, String, String)>, ToolCallParser) {
        let mut parser = ToolCallParser::new(format);
        let chars: Vec<char> = text.chars().collect();
        let mut deltas = Vec::new();
        for piece in chars.chunks(step.max(1)) {
            deltas.push(parser.push(&piece.iter().collect::<String>()));
        }
        deltas.push(parser.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for d in deltas {
            content.push_str(&d.content);
            for c in d.calls {
                if c.index == calls.len() {
                    calls.push((c.id.expect("first delta has the id"), c.name.expect("and the name"), c.arguments));
                } else {
                    assert!(c.id.is_none() && c.name.is_none());
                    calls[c.index].2.push_str(&c.arguments);
                }
            }
        }
        (content, calls, parser)
    }

    fn check_all_steps(format: ToolCallFormat, text: &str, content: &str, expected: &[(&str, &str)]) {
        for step in [1, 2, 3, 5, 7, 1000] {
            let (got_content, calls, parser) = stream(format, text, step);
            assert_eq!(got_content, content, "content at step {step}");
            let got: Vec<(&str, &str)> = calls.iter().map(|(_, n, a)| (n.as_str(), a.as_str())).collect();
            assert_eq!(got, expected, "calls at step {step}");
            let whole: Vec<(&str, &str)> =
                parser.calls().unwrap_or_default().iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
            assert_eq!(whole, expected, "parsed calls at step {step}");
        }
    }

    #[test]
    fn hermes_single_and_parallel_calls_with_leading_content() {
        check_all_steps(
            ToolCallFormat::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>",
            "Let me check.\n",
            &[("get_weather", "{\"city\": \"Paris\", \"days\": [1, 2]}")],
        );
        check_all_steps(
            ToolCallFormat::Hermes,
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": \"}{\\\"<tool_call>\"}}\n</tool_call>\n<tool_call>\n{\"arguments\": {}, \"name\": \"b\"}\n</tool_call>",
            "",
            &[("a", "{\"s\": \"}{\\\"<tool_call>\"}"), ("b", "{}")],
        );
    }

    #[test]
    fn text_that_only_looks_like_a_marker_is_content() {
        check_all_steps(ToolCallFormat::Hermes, "a <tool but not a call <tool_", "a <tool but not a call <tool_", &[]);
        check_all_steps(ToolCallFormat::Mistral, "[TOOL] x [", "[TOOL] x [", &[]);
        check_all_steps(ToolCallFormat::Llama3Json, "  Hello {not a call", "  Hello {not a call", &[]);
    }

    #[test]
    fn llama3_json_calls_with_parameters_and_semicolons() {
        check_all_steps(
            ToolCallFormat::Llama3Json,
            " {\"name\": \"f\", \"parameters\": {\"x\": 1.5}}; {\"name\": \"g\", \"parameters\": {\"y\": null}}",
            "",
            &[("f", "{\"x\": 1.5}"), ("g", "{\"y\": null}")],
        );
        check_all_steps(
            ToolCallFormat::Llama3Json,
            "<|python_tag|>{\"name\": \"f\", \"arguments\": {}}",
            "",
            &[("f", "{}")],
        );
    }

    #[test]
    fn mistral_array_and_args_forms() {
        check_all_steps(
            ToolCallFormat::Mistral,
            "Sure. [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\", \"arguments\": {\"b\": [true]}}]",
            "Sure. ",
            &[("f", "{\"a\": 1}"), ("g", "{\"b\": [true]}")],
        );
        check_all_steps(
            ToolCallFormat::Mistral,
            "[TOOL_CALLS]get_time[ARGS]{\"tz\": \"UTC\"}[TOOL_CALLS]other[ARGS]{}",
            "",
            &[("get_time", "{\"tz\": \"UTC\"}"), ("other", "{}")],
        );
    }

    #[test]
    fn string_encoded_arguments_are_decoded_and_missing_ones_are_empty() {
        check_all_steps(
            ToolCallFormat::Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>",
            "",
            &[("f", "{\"a\": 1}")],
        );
        check_all_steps(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\"}</tool_call>", "", &[("f", "{}")]);
    }

    #[test]
    fn a_call_cut_off_or_malformed_is_not_valid() {
        let (_, calls, parser) = stream(ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ", 3);
        assert_eq!(calls.len(), 1, "the header was streamed");
        assert!(parser.calls().is_none());
        let (_, _, parser) = stream(ToolCallFormat::Hermes, "<tool_call>{\"nam\": \"f\"}</tool_call>", 4);
        assert!(parser.calls().is_none());
        let (_, _, parser) = stream(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\" 1}}</tool_call>", 4);
        assert!(parser.calls().is_none());
    }

    #[test]
    fn a_cut_off_call_is_dropped_and_the_calls_before_it_stand() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"g\", \"argu";
        for step in [1, 3, 1000] {
            let (content, _, parser) = stream(ToolCallFormat::Hermes, text, step);
            let calls = parser.calls().expect("the complete call stands");
            assert_eq!((calls.len(), calls[0].name.as_str(), content.as_str()), (1, "f", ""), "step {step}");
        }
        // A closing marker cut off at the end is not content.
        let (content, calls, _) = stream(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\"}</tool_call", 2);
        assert_eq!((content.as_str(), calls.len()), ("", 1));
    }

    #[test]
    fn markup_that_no_call_came_of_is_content_in_every_step_size() {
        for text in ["<tool_call>\n\n<tool_call>", "Sure. <tool_call>\n{\"na"] {
            for step in [1, 2, 5, 1000] {
                let (content, calls, parser) = stream(ToolCallFormat::Hermes, text, step);
                assert_eq!((content.as_str(), calls.len()), (text, 0), "step {step}");
                assert!(parser.calls().is_none() && !parser.malformed());
            }
        }
    }

    #[test]
    fn a_single_call_parser_drops_what_follows_the_first_call() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"g\"}</tool_call> bye";
        for step in [1, 4, 1000] {
            let mut parser = ToolCallParser::new(ToolCallFormat::Hermes).single_call();
            let chars: Vec<char> = text.chars().collect();
            let mut deltas: Vec<ParsedDelta> = chars.chunks(step).map(|c| parser.push(&c.iter().collect::<String>())).collect();
            deltas.push(parser.finish());
            assert!(deltas.iter().all(|d| d.content.is_empty() && d.calls.iter().all(|c| c.index == 0)), "step {step}: {deltas:?}");
            let calls = parser.calls().unwrap();
            assert_eq!((calls.len(), calls[0].name.as_str()), (1, "f"));
        }
    }

    #[test]
    fn ids_are_unique_and_shaped_per_format() {
        let (_, calls, _) = stream(ToolCallFormat::Hermes, "<tool_call>{\"name\": \"f\"}</tool_call><tool_call>{\"name\": \"f\"}</tool_call>", 1000);
        assert_eq!(calls.len(), 2);
        assert_ne!(calls[0].0, calls[1].0);
        assert!(calls[0].0.starts_with("call_") && calls[0].0.len() == 29);
        let (_, calls, _) = stream(ToolCallFormat::Mistral, "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]", 1000);
        assert!(calls[0].0.len() == 9 && calls[0].0.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
