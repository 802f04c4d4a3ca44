//! Hugging Face chat templates rendered with minijinja.
//!
//! `transformers` renders `chat_template` with jinja2 (`trim_blocks=True`,
//! `lstrip_blocks=True`, the `loopcontrols` extension) and exposes `messages`,
//! `add_generation_prompt`, the special-token strings, `raise_exception(msg)`,
//! `strftime_now(fmt)` and a `tojson` filter that does not HTML-escape. [`ChatTemplate`]
//! reproduces that environment: the template is compiled once when it is created, Python string /
//! dict / list methods (`.strip()`, `.startswith()`, `.items()`, ...) come from
//! `minijinja_contrib::pycompat`, and `tojson` / `strftime_now` live in [`super::template_fns`].

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::template_fns;
use super::TokenizerError;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message as a template sees it: `message['role']`, `message['content']` (a string,
/// or a list of `{"type": "text", "text": ...}` parts) and any extra fields (`name`,
/// `tool_calls`, `tool_call_id`, ...) passed through unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// `null` or absent in assistant turns that only call tools.
    #[serde(default)]
    pub content: ChatContent,
    /// Extra fields, serialized next to `role` and `content`.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ChatMessage {
    /// A message with plain-text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: ChatContent::Text(content.into()),
            extra: BTreeMap::new(),
        }
    }
}

/// Message content: a string, a list of typed parts, or none (`null`, as in an assistant turn
/// that only calls tools).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
    #[default]
    Null,
}

/// One part of list-valued content, e.g. `{"type": "text", "text": "hi"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ContentPart {
    /// A `{"type": "text", "text": ...}` part.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            kind: "text".to_string(),
            text: Some(text.into()),
            extra: BTreeMap::new(),
        }
    }
}

/// Special-token strings exposed to the template as `bos_token`, `eos_token`, ...
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokenStrings {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    specials: SpecialTokenStrings,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("specials", &self.specials)
            .finish()
    }
}

/// Render a minijinja error with its source chain and template location.
fn describe(err: &minijinja::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl ChatTemplate {
    /// Compile `source`. Syntax errors are reported here, not at render time.
    pub fn new(
        source: impl Into<String>,
        specials: SpecialTokenStrings,
    ) -> Result<Self, TokenizerError> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::ChatTemplate(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", template_fns::raise_exception);
        env.add_function("strftime_now", template_fns::strftime_now);
        env.add_filter("tojson", template_fns::tojson);
        env.set_formatter(template_fns::python_formatter);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| {
                TokenizerError::ChatTemplate(format!(
                    "cannot compile chat template: {}",
                    describe(&e)
                ))
            })?;
        Ok(Self {
            env,
            source,
            specials,
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special-token strings given to the template.
    pub fn special_tokens(&self) -> &SpecialTokenStrings {
        &self.specials
    }

    /// Render `messages`. `extra` adds (or overrides) top-level template variables, e.g.
    /// `tools`, `documents` or template-specific flags like `enable_thinking`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, TokenizerError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let opt = |s: &Option<String>| {
            s.as_ref()
                .map(|s| Value::from(s.as_str()))
                .unwrap_or(Value::from(()))
        };
        ctx.insert("bos_token".into(), opt(&self.specials.bos_token));
        ctx.insert("eos_token".into(), opt(&self.specials.eos_token));
        ctx.insert("unk_token".into(), opt(&self.specials.unk_token));
        ctx.insert("pad_token".into(), opt(&self.specials.pad_token));
        if let Some(extra) = extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), Value::from(Serde(v)));
            }
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::ChatTemplate(describe(&e)))?;
        tmpl.render(Value::from(ctx)).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(msg) = e
                    .detail()
                    .and_then(|d| d.strip_prefix(template_fns::RAISED_PREFIX))
                {
                    return TokenizerError::ChatTemplateRaised(msg.to_string());
                }
            }
            TokenizerError::ChatTemplate(format!("cannot render chat template: {}", describe(&e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        ChatTemplate::new(
            src,
            SpecialTokenStrings {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    #[test]
    fn chatml_with_generation_prompt() {
        let t = tmpl("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}");
        let out = t.render(&user("hi"), true, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&user("hi"), false, None).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        // With trim_blocks the newline after a block tag is dropped; with lstrip_blocks the
        // indentation before a block tag is dropped.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = tmpl(src);
        let out = t
            .render(
                &[
                    ChatMessage::new("user", "a"),
                    ChatMessage::new("system", "b"),
                ],
                false,
                None,
            )
            .unwrap();
        assert_eq!(out, "U:a\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = tmpl("{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok");
        match t.render(&user("x"), false, None) {
            Err(TokenizerError::ChatTemplateRaised(msg)) => {
                assert_eq!(msg, "first message must be system")
            }
            other => panic!("expected ChatTemplateRaised, got {other:?}"),
        }
        let err = t.render(&user("x"), false, None).unwrap_err().to_string();
        assert!(err.contains("first message must be system"), "{err}");
        assert_eq!(
            t.render(&[ChatMessage::new("system", "s")], false, None)
                .unwrap(),
            "ok"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = tmpl("{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true], 'b': '<x>\"é'} | tojson }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}");
        let out = t.render(&user("hi & <b>"), false, None).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"hi & <b>\"}|{\"a\": [1, 2.5, null, true], \"b\": \"<x>\\\"é\"}|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]"
        );
    }

    #[test]
    fn python_string_methods() {
        let t = tmpl("{{ messages[0].content.strip() }}|{{ messages[0].content.strip().startswith('he') }}|{{ 'a,b'.split(',') | join('+') }}|{{ messages[0].content.upper() }}");
        assert_eq!(
            t.render(&user("  hello "), false, None).unwrap(),
            "hello|True|a+b|  HELLO "
        );
    }

    #[test]
    fn list_content_and_special_tokens() {
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: ChatContent::Parts(vec![ContentPart::text("one"), ContentPart::text("two")]),
            extra: BTreeMap::new(),
        }];
        let t = tmpl("{{ bos_token }}{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'text' %}[{{ p.text }}]{% endif %}{% endfor %}{% endif %}{% endfor %}{{ eos_token }}");
        assert_eq!(t.render(&msgs, false, None).unwrap(), "<s>[one][two]</s>");
    }

    #[test]
    fn loop_controls_and_namespace() {
        let t = tmpl("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}={{ ns.n }}");
        let msgs: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, c)| ChatMessage::new(if i == 1 { "skip" } else { "user" }, *c))
            .collect();
        assert_eq!(t.render(&msgs, false, None).unwrap(), "ac=2");
    }

    #[test]
    fn strftime_now_and_extra_vars() {
        let t = tmpl("{{ strftime_now('%Y') | length }}{% if tools %}T{% endif %}");
        let mut extra = serde_json::Map::new();
        extra.insert("tools".into(), serde_json::json!([{"name": "f"}]));
        assert_eq!(t.render(&user("x"), false, Some(&extra)).unwrap(), "4T");
        assert_eq!(t.render(&user("x"), false, None).unwrap(), "4");
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", SpecialTokenStrings::default())
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("chat template"), "{msg}");
    }
}
