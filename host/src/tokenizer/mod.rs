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
pub use detokenizer::IncrementalDetokenizer;
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
    chat_template: Option<ChatTemplate>,
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
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
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
    /// writes them), as `transformers`' `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests;
