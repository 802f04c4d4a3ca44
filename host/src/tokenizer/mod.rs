//! Tokenization: the `tokenizers` crate from `tokenizer.json` or built from GGUF metadata, chat
//! templates and incremental detokenizing for streaming.
//!
//! [`Tokenizer`] is the one type the rest of the server uses. It wraps a
//! `tokenizers::Tokenizer` (loaded from a Hugging Face `tokenizer.json`, or assembled from a
//! [`GgufTokenizerSpec`] by [`gguf`]) together with what the server needs around it: BOS/EOS/PAD
//! ids, the set of stop token ids, whether BOS is added, the special-token strings and the
//! compiled chat template ([`ChatTemplate`]). [`IncrementalDetokenizer`] turns a stream of
//! generated ids into text pieces that are safe to send.

mod chat_template;
mod detokenizer;
pub mod gguf;
mod template_fns;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use chat_template::{ChatContent, ChatMessage, ChatTemplate, ContentPart, SpecialTokenStrings};
pub use detokenizer::{IncrementalDetokenizer, CONTEXT_TOKENS};
pub use gguf::GgufTokenizerSpec;

/// Everything that can go wrong loading a tokenizer, encoding, decoding or rendering a chat
/// template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path} as JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("invalid GGUF tokenizer metadata: {0}")]
    InvalidSpec(String),
    #[error("invalid tokenizer config: {0}")]
    InvalidConfig(String),
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    InvalidTokenId { id: u32, vocab_size: usize },
    #[error("the model has no chat template")]
    NoChatTemplate,
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    #[error("the chat template raised an exception: {0}")]
    ChatTemplateRaised(String),
}

/// Token texts llama.cpp treats as end-of-generation when they are control tokens.
const EOG_TOKEN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
];

/// A tokenizer plus the model-level facts around it (special ids, stop ids, chat template).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    unk_token_id: Option<u32>,
    stop_token_ids: Vec<u32>,
    add_bos_token: bool,
    specials: SpecialTokenStrings,
    special_ids: HashSet<u32>,
    /// How the special tokens are spelled (`<|im_end|>`, ...).
    special_texts: Vec<String>,
    /// `inner` with special-token spellings encoded as text (`encode_as_text`), made when needed.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    chat_template: Option<ChatTemplate>,
}

/// What stands in for message `index`'s content while a template renders (private-use
/// characters, so no template or text makes one by accident; a user who types one only changes
/// their own content, which is never rendered on this path).
fn placeholder(index: usize) -> String {
    format!("\u{F8FF}pagedserve-content-{index}\u{F8FF}")
}

/// The text before the first placeholder in `text`, its index and the text after it.
fn next_placeholder(text: &str, count: usize) -> Option<(&str, usize, &str)> {
    const OPEN: &str = "\u{F8FF}pagedserve-content-";
    let mut from = 0;
    while let Some(at) = text[from..].find(OPEN).map(|i| from + i) {
        let digits_at = at + OPEN.len();
        let end = text[digits_at..].find('\u{F8FF}').map(|i| digits_at + i);
        if let Some(index) = end.and_then(|end| text[digits_at..end].parse::<usize>().ok()).filter(|&i| i < count) {
            return Some((&text[..at], index, &text[end.unwrap() + '\u{F8FF}'.len_utf8()..]));
        }
        from = digits_at;
    }
    None
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("stop_token_ids", &self.stop_token_ids)
            .field("add_bos_token", &self.add_bos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` dict `{content}`.
fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of `{name, template}` of
/// which the one named `default` is used.
fn config_chat_template(config: &serde_json::Value) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |item: &serde_json::Value| {
                Some((
                    item.get("name")?.as_str()?.to_string(),
                    item.get("template")?.as_str()?.to_string(),
                ))
            };
            let templates: Vec<(String, String)> = list.iter().filter_map(named).collect();
            match templates.iter().find(|(n, _)| n == "default") {
                Some((_, t)) => Ok(Some(t.clone())),
                None => {
                    let names: Vec<&str> = templates.iter().map(|(n, _)| n.as_str()).collect();
                    tracing::warn!(
                        ?names,
                        "chat_template list has no \"default\" entry; using no chat template"
                    );
                    Ok(None)
                }
            }
        }
        Some(other) => Err(TokenizerError::InvalidConfig(format!(
            "chat_template must be a string or a list of {{name, template}}, got {other}"
        ))),
    }
}

impl Tokenizer {
    /// Load a Hugging Face tokenizer: `tokenizer.json`, plus `tokenizer_config.json` when given
    /// (`chat_template`, `bos_token`, `eos_token`, `pad_token`, `unk_token`, `add_bos_token`).
    /// A `chat_template.jinja` beside the config (or beside `tokenizer.json` when there is no
    /// config) takes precedence over the config's `chat_template`, as in `transformers`. A
    /// `generation_config.json` there adds its `eos_token_id` (int or list) to the stop ids.
    pub fn from_file(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| TokenizerError::Load {
                path: tokenizer_json.to_path_buf(),
                message: e.to_string(),
            })?;
        let config = match tokenizer_config {
            Some(p) => read_json(p)?,
            None => serde_json::Value::Object(Default::default()),
        };
        let dir = tokenizer_config
            .unwrap_or(tokenizer_json)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| TokenizerError::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            config_chat_template(&config)?
        };

        let specials = SpecialTokenStrings {
            bos_token: config_token(&config, "bos_token"),
            eos_token: config_token(&config, "eos_token"),
            unk_token: config_token(&config, "unk_token"),
            pad_token: config_token(&config, "pad_token"),
        };
        let id_of = |s: &Option<String>| s.as_deref().and_then(|t| inner.token_to_id(t));
        let bos_token_id = id_of(&specials.bos_token);
        let eos_token_id = id_of(&specials.eos_token);
        let unk_token_id = id_of(&specials.unk_token);
        let pad_token_id = id_of(&specials.pad_token);

        let add_bos_token = match config.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b,
            None => {
                // Whatever the tokenizer.json post-processor does.
                let with = inner
                    .encode_fast("a", true)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default();
                bos_token_id.is_some() && with.first().copied() == bos_token_id
            }
        };

        let mut stop_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen = read_json(&gen_path)?;
            let ids: Vec<u32> = match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().into_iter().map(|n| n as u32).collect()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|n| n as u32)
                    .collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if !stop_token_ids.contains(&id) {
                    stop_token_ids.push(id);
                }
            }
        }
        let vocab_size = inner.get_vocab_size(true);
        Self::assemble(
            inner,
            vocab_size,
            [bos_token_id, eos_token_id, pad_token_id, unk_token_id],
            stop_token_ids,
            add_bos_token,
            specials,
            chat_template,
        )
    }

    /// [`from_file`](Self::from_file) on a model directory: `dir/tokenizer.json` and, if present,
    /// `dir/tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = dir.join("tokenizer_config.json");
        Self::from_file(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
        )
    }

    /// Build the tokenizer described by GGUF metadata (see [`gguf`]). Stop ids are the EOS id
    /// plus the control tokens llama.cpp treats as end-of-generation (`<|im_end|>`,
    /// `<|endoftext|>`, `<|eot_id|>`, ...).
    pub fn from_gguf_spec(spec: &GgufTokenizerSpec) -> Result<Self, TokenizerError> {
        let inner = gguf::build_tokenizer(spec)?;
        let text = |id: Option<u32>| id.and_then(|id| spec.tokens.get(id as usize).cloned());
        let specials = SpecialTokenStrings {
            bos_token: text(spec.bos_token_id),
            eos_token: text(spec.eos_token_id),
            unk_token: text(spec.unknown_token_id),
            pad_token: text(spec.padding_token_id),
        };
        let mut stop_token_ids: Vec<u32> = spec.eos_token_id.into_iter().collect();
        for (id, tok) in spec.tokens.iter().enumerate() {
            if spec.token_type(id) == gguf::token_type::CONTROL
                && EOG_TOKEN_TEXTS.contains(&tok.as_str())
                && !stop_token_ids.contains(&(id as u32))
            {
                stop_token_ids.push(id as u32);
            }
        }
        let vocab_size = spec.tokens.len().max(inner.get_vocab_size(true));
        Self::assemble(
            inner,
            vocab_size,
            [
                spec.bos_token_id,
                spec.eos_token_id,
                spec.padding_token_id,
                spec.unknown_token_id,
            ],
            stop_token_ids,
            spec.effective_add_bos(),
            specials,
            spec.chat_template.clone(),
        )
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        vocab_size: usize,
        [bos_token_id, eos_token_id, pad_token_id, unk_token_id]: [Option<u32>; 4],
        stop_token_ids: Vec<u32>,
        add_bos_token: bool,
        specials: SpecialTokenStrings,
        chat_template: Option<String>,
    ) -> Result<Self, TokenizerError> {
        for (what, id) in [
            ("BOS", bos_token_id),
            ("EOS", eos_token_id),
            ("PAD", pad_token_id),
            ("UNK", unk_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= vocab_size {
                    return Err(TokenizerError::InvalidConfig(format!(
                        "{what} token id {id} is outside the vocabulary of {vocab_size} tokens"
                    )));
                }
            }
        }
        let specials_added: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let special_ids = specials_added.iter().map(|(id, _)| *id).collect();
        let special_texts = specials_added.into_iter().map(|(_, text)| text).filter(|t| !t.is_empty()).collect();
        let chat_template = chat_template
            .map(|src| ChatTemplate::new(src, specials.clone()))
            .transpose()?;
        Ok(Self {
            inner,
            vocab_size,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            unk_token_id,
            stop_token_ids,
            add_bos_token,
            specials,
            special_ids,
            special_texts,
            plain: std::sync::OnceLock::new(),
            chat_template,
        })
    }

    /// Encode `text`. Special tokens written in the text (`<|im_start|>`) are recognised.
    /// With `add_special_tokens`, BOS (and whatever else the post-processor adds) is added when
    /// the model wants it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decode `ids` to text; special tokens are dropped with `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Error on the first id outside the vocabulary (the `tokenizers` crate silently drops them).
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::InvalidTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. `"Ġworld"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids that end generation: EOS first, then any others (see the constructors).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_token_ids.contains(&id)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The primary EOS id (`eos_token_ids()[0]` when set).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token_id
    }

    /// Whether `encode(text, true)` starts with BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// BOS/EOS/UNK/PAD strings (as given to chat templates).
    pub fn special_tokens(&self) -> &SpecialTokenStrings {
        &self.specials
    }

    /// Whether `id` is a special token (dropped by `skip_special_tokens`).
    pub fn is_special_token_id(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The chat template source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// Replace the chat template (e.g. from a `--chat-template` flag).
    pub fn set_chat_template(&mut self, source: impl Into<String>) -> Result<(), TokenizerError> {
        self.chat_template = Some(ChatTemplate::new(source, self.specials.clone())?);
        Ok(())
    }

    /// Render the chat template for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_with(messages, add_generation_prompt, None)
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with extra template variables
    /// (`tools`, `documents`, template-specific flags).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, TokenizerError> {
        self.chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?
            .render(messages, add_generation_prompt, extra)
    }

    /// Render the chat template and encode it without adding special tokens (the template
    /// writes them), as `transformers`' `apply_chat_template(tokenize=True)` does; special-token
    /// text inside the messages stays text (`encode_rendered_chat`).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_rendered_chat(messages, |m| self.apply_chat_template(m, add_generation_prompt))
    }

    /// Encodes what `render` (a chat template) makes of `messages`, so that only the template
    /// writes special tokens: a non-assistant message whose content spells one (`<|im_end|>`
    /// typed by a user, to forge a turn boundary) is rendered with a placeholder in its place,
    /// and its content is encoded as plain text where the placeholder lands. Conversations
    /// without such text are rendered and encoded whole, as `transformers` does.
    pub fn encode_rendered_chat(
        &self,
        messages: &[ChatMessage],
        render: impl Fn(&[ChatMessage]) -> Result<String, TokenizerError>,
    ) -> Result<Vec<u32>, TokenizerError> {
        // Assistant turns are the model's own writing (tool calls in its format included), so
        // only what users, systems and tools put in the conversation is held to text.
        let spells_special = |m: &ChatMessage| match &m.content {
            ChatContent::Text(text) if m.role != "assistant" => self.special_texts.iter().any(|s| text.contains(s.as_str())),
            _ => false,
        };
        if !messages.iter().any(spells_special) {
            return self.encode(&render(messages)?, false);
        }
        let mut contents = Vec::new();
        let placeheld: Vec<ChatMessage> = messages
            .iter()
            .map(|m| match &m.content {
                ChatContent::Text(text) if spells_special(m) => {
                    contents.push(text.as_str());
                    ChatMessage { content: ChatContent::Text(placeholder(contents.len() - 1)), ..m.clone() }
                }
                _ => m.clone(),
            })
            .collect();
        let rendered = render(&placeheld)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some((before, index, after)) = next_placeholder(rest, contents.len()) {
            ids.extend(self.encode(before, false)?);
            ids.extend(self.encode_as_text(contents[index])?);
            rest = after;
        }
        ids.extend(self.encode(rest, false)?);
        Ok(ids)
    }

    /// Encodes `text` with every special-token spelling in it taken as ordinary text.
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let plain = self.plain.get_or_init(|| {
            let mut plain = self.inner.clone();
            plain.set_encode_special_tokens(true);
            plain
        });
        let enc = plain.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The spellings of the special tokens (`<|im_end|>`, ...), none empty.
    pub fn special_token_texts(&self) -> &[String] {
        &self.special_texts
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
pub(crate) mod tests;
