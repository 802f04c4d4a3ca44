//! Request → engine request: tokenization (the chat template with a generation prompt for chat),
//! limits (prompt length against `max_model_len`, `max_tokens`, `n`, stop strings, token ids within
//! the vocabulary) and sampling parameters (`SamplingParams::validate`). Everything that reaches
//! the engine passed through here, so the engine may assume in-range values.
//!
//! Every error names the request field it is about (`ValidationError::field`), which the server
//! returns as the OpenAI error body's `param`.

use std::sync::{Arc, OnceLock};

use crate::api::{ChatCompletionRequest, CompletionRequest, GenerationParams, Prompt};
use crate::constraint::{Constraint, ConstraintEngine};
use crate::engine::GenerateRequest;
use crate::plugin::PluginRegistry;
use crate::sampling::{SamplingParams, SamplingParamsError};
use crate::tokenizer::{ChatContent, ChatMessage, Tokenizer, TokenizerError};
use crate::tool_calls::{prepare_messages, TemplateSupport, ToolCallFormat, ToolRequest};

/// Most samples per prompt.
pub const MAX_N: usize = 16;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 8;
/// Most alternatives per token: completions (`logprobs`) and chat (`top_logprobs`).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;
pub const MAX_CHAT_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("`{field}` {message}")]
    Invalid { field: &'static str, message: String },
    /// The prompt, or the prompt plus `max_tokens`, does not fit the context (vLLM's wording).
    #[error("{message}")]
    ContextLength { field: &'static str, message: String },
    #[error(transparent)]
    Sampling(#[from] SamplingParamsError),
    #[error("`{field}`: {source}")]
    Tokenizer {
        field: &'static str,
        #[source]
        source: TokenizerError,
    },
    #[error("no sampler plugin named {0} is loaded")]
    UnknownSampler(String),
    #[error("no constraint plugin named {0} is loaded")]
    UnknownConstraint(String),
    #[error("`{field}` is not supported: {message}")]
    Unsupported { field: &'static str, message: String },
}

impl ValidationError {
    /// The request field the error is about.
    pub fn field(&self) -> &str {
        match self {
            ValidationError::Invalid { field, .. }
            | ValidationError::ContextLength { field, .. }
            | ValidationError::Tokenizer { field, .. }
            | ValidationError::Unsupported { field, .. } => field,
            ValidationError::Sampling(e) => e.field,
            ValidationError::UnknownSampler(_) => "sampler",
            ValidationError::UnknownConstraint(_) => "constraint",
        }
    }
}

/// Roles a chat message may have.
const CHAT_ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// The messages as the template sees them: every role checked, and list-valued content (text
/// parts) joined into one string, since chat templates such as SmolLM2's only concatenate
/// strings. A part that is not text (an image, audio) is refused: the models served read text.
/// Borrowed as they are when no message has parts.
fn text_messages(messages: &[ChatMessage]) -> Result<std::borrow::Cow<'_, [ChatMessage]>, ValidationError> {
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
        return Err(invalid("messages", format!("[{i}].role `{}` is not one of {}", m.role, CHAT_ROLES.join(", "))));
    }
    if !messages.iter().any(|m| matches!(m.content, ChatContent::Parts(_))) {
        return Ok(std::borrow::Cow::Borrowed(messages));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let ChatContent::Parts(parts) = &m.content else { return Ok(m.clone()) };
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(text)) => texts.push(text.as_str()),
                    ("text", None) => return Err(invalid("messages", format!("[{i}].content[{j}] is a text part without `text`"))),
                    (kind, _) => {
                        return Err(invalid(
                            "messages",
                            format!("[{i}].content[{j}] has type `{kind}`: only `text` parts are supported (this model reads text)"),
                        ))
                    }
                }
            }
            Ok(ChatMessage { content: ChatContent::Text(texts.join("\n")), ..m.clone() })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(std::borrow::Cow::Owned)
}

fn invalid(field: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError::Invalid { field, message: message.into() }
}

/// A request ready for the engine: one `GenerateRequest` per prompt, and how to render the answer.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub requests: Vec<GenerateRequest>,
    /// Text of each prompt (given or decoded), for `echo`.
    pub prompt_texts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Log-probs asked for, with this many alternatives per token.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// Chat with tools: the output is parsed for tool calls written in this format.
    pub tool_format: Option<ToolCallFormat>,
    /// With `tool_format`: whether more than one call is kept (`parallel_tool_calls`).
    pub parallel_tool_calls: bool,
}

impl ValidRequest {
    /// Choices in the response: `n` per prompt, prompt-major (`index = prompt * n + sample`).
    pub fn num_choices(&self) -> usize {
        self.requests.len() * self.n
    }
}

/// Validates requests against one model's tokenizer and limits.
pub struct Validator {
    tokenizer: Arc<Tokenizer>,
    max_model_len: usize,
    /// Token ids must be below this (the model's embedding rows and the tokenizer's vocabulary).
    vocab_size: usize,
    /// Where sampler plugins named by requests are looked up (`None`: no plugins, any name is
    /// unknown).
    plugins: Option<Arc<PluginRegistry>>,
    /// The model's vocabulary indexed for structured outputs, built by the first request that
    /// asks for one (or why it cannot be).
    constraints: Arc<OnceLock<Result<Arc<ConstraintEngine>, String>>>,
    model_vocab_size: usize,
    /// How the model writes tool calls (its template's format, or `--tool-call-parser`).
    tool_format: ToolCallFormat,
    /// What the chat template renders of tools, probed on first use.
    template_support: Arc<OnceLock<TemplateSupport>>,
}

impl Validator {
    pub fn new(tokenizer: Arc<Tokenizer>, max_model_len: usize, model_vocab_size: usize) -> Self {
        let vocab_size = model_vocab_size.min(tokenizer.vocab_size());
        let tool_format = ToolCallFormat::detect(tokenizer.chat_template());
        Validator {
            tokenizer,
            max_model_len,
            vocab_size,
            plugins: None,
            constraints: Default::default(),
            model_vocab_size,
            tool_format,
            template_support: Default::default(),
        }
    }

    /// Parses tool calls in `format` instead of the one the chat template suggests.
    pub fn with_tool_call_format(mut self, format: Option<ToolCallFormat>) -> Self {
        if let Some(format) = format {
            self.tool_format = format;
        }
        self
    }

    pub fn tool_call_format(&self) -> ToolCallFormat {
        self.tool_format
    }

    fn template_support(&self) -> TemplateSupport {
        *self.template_support.get_or_init(|| TemplateSupport::probe(&self.tokenizer))
    }

    /// Indexes the vocabulary for structured outputs now (the server calls it on a thread of its
    /// own at start-up, so that the first structured request does not wait for it).
    pub fn warm_constraints(&self) {
        if let Err(e) = self.constraints() {
            tracing::warn!("structured outputs are unavailable: {e}");
        }
    }

    /// The constraint engine, indexed on first use; `Err` says why structured outputs are not
    /// available for this model.
    fn constraints(&self) -> Result<&ConstraintEngine, String> {
        let engine = self.constraints.get_or_init(|| {
            let eos = self.constrained_eos()?;
            ConstraintEngine::new(self.tokenizer.clone(), self.model_vocab_size, eos).map(Arc::new).map_err(|e| e.to_string())
        });
        engine.as_deref().map_err(Clone::clone)
    }

    /// The token that ends a constrained output.
    fn constrained_eos(&self) -> Result<u32, String> {
        self.tokenizer
            .eos_token_id()
            .or_else(|| self.tokenizer.eos_token_ids().first().copied())
            .ok_or_else(|| "needs the model to have an end-of-sequence token".to_string())
    }

    /// The constraint of a request: its structured-output field, or the constraint plugin it
    /// names (one of the two).
    fn constraint(&self, params: &GenerationParams) -> Result<Option<Constraint>, ValidationError> {
        let grammar = params.extra.constraint().map_err(|e| invalid(e.field, e.message))?;
        let plugin = params.constraint_plugin().map_err(|e| invalid(e.field, e.message))?;
        match (grammar, plugin) {
            (Some((field, _)), Some(_)) => {
                Err(invalid("constraint", format!("conflicts with `{field}`: give one constraint")))
            }
            (Some((field, spec)), None) => {
                let engine = self.constraints().map_err(|message| invalid(field, message))?;
                Ok(Some(engine.compile(&spec).map_err(|e| invalid(field, e.to_string()))?))
            }
            (None, Some((name, config))) => {
                let loaded = self.plugins.as_ref().and_then(|p| p.constraint(&name)).is_some_and(|s| s.active_version().is_some());
                if !loaded {
                    return Err(ValidationError::UnknownConstraint(name));
                }
                let eos = self.constrained_eos().map_err(|message| invalid("constraint", message))?;
                Ok(Some(Constraint::plugin(&name, &config, eos)))
            }
            (None, None) => Ok(None),
        }
    }

    /// Accepts `sampler` names that are loaded (with an active version) in `plugins`.
    pub fn with_plugins(mut self, plugins: Arc<PluginRegistry>) -> Self {
        self.plugins = Some(plugins);
        self
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn completion(&self, request: CompletionRequest) -> Result<ValidRequest, ValidationError> {
        if request.suffix.is_some() {
            return Err(ValidationError::Unsupported { field: "suffix", message: "insertion is not implemented".into() });
        }
        let echo = request.echo.unwrap_or(false);
        if let Some(k) = request.logprobs {
            if k > MAX_COMPLETION_LOGPROBS {
                return Err(invalid("logprobs", format!("must be in 0..={MAX_COMPLETION_LOGPROBS}, got {k}")));
            }
            if echo {
                return Err(ValidationError::Unsupported {
                    field: "echo",
                    message: "`echo` with `logprobs` needs prompt log-probs, which are not computed".into(),
                });
            }
        }
        let prompts: Vec<(Vec<u32>, String)> = match request.prompt {
            None => return Err(invalid("prompt", "is required")),
            Some(Prompt::Text(text)) => vec![(self.encode(&text)?, text)],
            Some(Prompt::Texts(texts)) => {
                if texts.is_empty() {
                    return Err(invalid("prompt", "must not be an empty list"));
                }
                texts.into_iter().map(|t| Ok((self.encode(&t)?, t))).collect::<Result<_, ValidationError>>()?
            }
            Some(Prompt::Tokens(ids)) => vec![self.token_prompt(ids)?],
            Some(Prompt::TokenLists(lists)) => {
                if lists.is_empty() {
                    return Err(invalid("prompt", "must not be an empty list"));
                }
                lists.into_iter().map(|ids| self.token_prompt(ids)).collect::<Result<_, ValidationError>>()?
            }
        };
        let n = self.n(&request.params)?;
        if let Some(best_of) = request.best_of {
            if best_of == 0 {
                return Err(invalid("best_of", "must be at least 1"));
            }
            if best_of > n as u64 {
                return Err(ValidationError::Unsupported {
                    field: "best_of",
                    message: format!("best_of ({best_of}) greater than n ({n}) is not implemented"),
                });
            }
        }
        let logprobs = request.logprobs.map(|k| k as usize);
        self.build(prompts, &request.params, None, n, logprobs, echo, "prompt")
    }

    pub fn chat(&self, request: ChatCompletionRequest) -> Result<ValidRequest, ValidationError> {
        let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
            (_, Some(k)) if k > MAX_CHAT_TOP_LOGPROBS => {
                return Err(invalid("top_logprobs", format!("must be in 0..={MAX_CHAT_TOP_LOGPROBS}, got {k}")))
            }
            (false, Some(k)) if k > 0 => return Err(invalid("top_logprobs", "needs `logprobs` to be true")),
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, _) => None,
        };
        let extra = &request.params.extra;
        let tools = ToolRequest::parse(extra.tools.as_ref(), extra.tool_choice.as_ref(), extra.parallel_tool_calls.as_ref())
            .map_err(|e| invalid(e.field, e.message))?;
        if tools.as_ref().is_some_and(ToolRequest::parses_output) {
            let plugin = request.params.constraint_plugin().map_err(|e| invalid(e.field, e.message))?.map(|_| ("constraint", ()));
            if let Some((field, _)) = extra.constraint().map_err(|e| invalid(e.field, e.message))?.map(|(f, _)| (f, ())).or(plugin) {
                return Err(ValidationError::Unsupported {
                    field,
                    message: "a structured-output constraint together with tools is not supported (unless `tool_choice` is `none`)".into(),
                });
            }
        }
        let tokens = self.encode_chat_with(&request.messages, request.add_generation_prompt.unwrap_or(true), tools.as_ref())?;
        let text = self.tokenizer.decode(&tokens, false).unwrap_or_default();
        let n = self.n(&request.params)?;
        let max_tokens = request.max_completion_tokens.or(request.params.max_tokens);
        let field = if request.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
        let mut valid = self.build(vec![(tokens, text)], &request.params, Some((max_tokens, field)), n, logprobs, false, "messages")?;
        if let Some(tools) = tools {
            self.apply_tools(&mut valid, &tools)?;
        }
        Ok(valid)
    }

    /// Checks every tool's parameter schema; `required` and named choices generate under the
    /// constraint of their calls; output that may hold calls is parsed (with special tokens kept
    /// where the format's marker is one).
    fn apply_tools(&self, valid: &mut ValidRequest, tools: &ToolRequest) -> Result<(), ValidationError> {
        let engine = self.constraints().map_err(|message| invalid("tools", message))?;
        for (i, spec) in tools.parameter_schemas().enumerate() {
            engine.compile(&spec).map_err(|e| invalid("tools", format!("[{i}] `function.parameters` is not a usable JSON schema: {e}")))?;
        }
        let marker = self.tokenizer.token_to_id("[TOOL_CALLS]").filter(|&id| self.tokenizer.is_special_token_id(id));
        if let Some(spec) = tools.constraint(self.tool_format, marker) {
            let compiled = engine.compile(&spec).map_err(|e| invalid("tool_choice", e.to_string()))?;
            for request in &mut valid.requests {
                request.constraint = Some(compiled.clone());
            }
        }
        if tools.parses_output() {
            valid.tool_format = Some(self.tool_format);
            valid.parallel_tool_calls = tools.parallel;
            if self.tool_format.needs_special_tokens() {
                for request in &mut valid.requests {
                    request.skip_special_tokens = false;
                }
            }
        }
        Ok(())
    }

    /// Tokens of `/tokenize`'s prompt form.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ValidationError> {
        self.tokenizer.encode(text, add_special_tokens).map_err(|source| ValidationError::Tokenizer { field: "prompt", source })
    }

    /// Renders the chat template (with the assistant's turn opened when `add_generation_prompt`)
    /// with the request's tools, if any; a history with tool calls or results is rendered as
    /// `tool_calls::prepare_messages` says, with or without tools.
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&ToolRequest>,
    ) -> Result<Vec<u32>, ValidationError> {
        if messages.is_empty() {
            return Err(invalid("messages", "must not be empty"));
        }
        let messages = &*text_messages(messages)?;
        let calls = |m: &ChatMessage| m.extra.get("tool_calls").is_some_and(|v| !v.is_null());
        if let Some(i) = messages.iter().position(|m| m.content == ChatContent::Null && !(m.role == "assistant" && calls(m))) {
            return Err(invalid("messages", format!("[{i}] needs `content` (only an assistant turn with `tool_calls` may leave it out)")));
        }
        let uses_tools = tools.is_some() || messages.iter().any(|m| m.role == "tool" || calls(m));
        // The template writes the special tokens; special-token text in a message stays text.
        let ids = if uses_tools {
            let (prepared, variables) = prepare_messages(messages, tools, self.template_support(), self.tool_format)
                .map_err(|e| invalid(e.field, e.message))?;
            self.tokenizer.encode_rendered_chat(&prepared, |m| {
                self.tokenizer.apply_chat_template_with(m, add_generation_prompt, variables.as_ref())
            })
        } else {
            self.tokenizer.encode_rendered_chat(messages, |m| self.tokenizer.apply_chat_template(m, add_generation_prompt))
        };
        ids.map_err(|source| ValidationError::Tokenizer { field: "messages", source })
    }

    /// Checks token ids (of a prompt, `/detokenize`, ...) against the vocabulary.
    pub fn check_ids(&self, field: &'static str, ids: &[u32]) -> Result<(), ValidationError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(invalid(field, format!("token id {id} is outside the vocabulary of {} tokens", self.vocab_size))),
            None => Ok(()),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ValidationError> {
        // vLLM's completions add the tokenizer's special tokens (BOS where the model uses one).
        self.encode_with(text, true)
    }

    fn token_prompt(&self, ids: Vec<u32>) -> Result<(Vec<u32>, String), ValidationError> {
        self.check_ids("prompt", &ids)?;
        let text = self.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    }

    fn n(&self, params: &GenerationParams) -> Result<usize, ValidationError> {
        match params.n.unwrap_or(1) {
            n @ 1..=16 => Ok(n as usize),
            n => Err(invalid("n", format!("must be in 1..={MAX_N}, got {n}"))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        prompts: Vec<(Vec<u32>, String)>,
        params: &GenerationParams,
        chat_max_tokens: Option<(Option<u64>, &'static str)>,
        n: usize,
        logprobs: Option<usize>,
        echo: bool,
        prompt_field: &'static str,
    ) -> Result<ValidRequest, ValidationError> {
        if let Some((field, message)) = params.extra.unimplemented(chat_max_tokens.is_some()) {
            return Err(ValidationError::Unsupported { field, message: message.into() });
        }
        let constraint = self.constraint(params)?;
        if let Some(name) = &params.sampler {
            // Only a sampler plugin with an active version may be named (the engine checks again
            // at admission, in case it is removed meanwhile).
            let loaded = self.plugins.as_ref().and_then(|p| p.sampler(name)).is_some_and(|s| s.active_version().is_some());
            if !loaded {
                return Err(ValidationError::UnknownSampler(name.clone()));
            }
        }
        let sampling = self.sampling(params, logprobs)?;
        let stop = params.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(invalid("stop", format!("allows at most {MAX_STOP_STRINGS} strings, got {}", stop.len())));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(invalid("stop", "strings must not be empty"));
        }
        let stop_token_ids = params.stop_token_ids.clone().unwrap_or_default();
        self.check_ids("stop_token_ids", &stop_token_ids)?;
        let (max_tokens, max_tokens_field) = chat_max_tokens.unwrap_or((params.max_tokens, "max_tokens"));
        if max_tokens == Some(0) {
            return Err(invalid(max_tokens_field, "must be at least 1, got 0"));
        }
        let mut requests = Vec::with_capacity(prompts.len());
        let mut prompt_texts = Vec::with_capacity(prompts.len());
        for (tokens, text) in prompts {
            let max_tokens = self.fit(tokens.len(), max_tokens, prompt_field, max_tokens_field)?;
            requests.push(GenerateRequest {
                prompt_tokens: tokens,
                sampling: sampling.clone(),
                max_tokens,
                n,
                stop: stop.clone(),
                stop_token_ids: stop_token_ids.clone(),
                ignore_eos: params.ignore_eos.unwrap_or(false),
                skip_special_tokens: params.skip_special_tokens.unwrap_or(true),
                include_stop_str_in_output: params.include_stop_str_in_output.unwrap_or(false),
                priority: params.priority.unwrap_or(0),
                tenant: params.user.clone().unwrap_or_default(),
                sampler: params.sampler.clone(),
                constraint: constraint.clone(),
            });
            prompt_texts.push(text);
        }
        let stream = params.stream.unwrap_or(false);
        if let Some(options) = &params.stream_options {
            // As vLLM and OpenAI answer: options of a stream on a request that is not one.
            if !stream {
                return Err(ValidationError::Invalid { field: "stream_options", message: "is only allowed when `stream` is true".into() });
            }
            if options.continuous_usage_stats == Some(true) {
                return Err(ValidationError::Unsupported { field: "stream_options", message: "`continuous_usage_stats` is not implemented; `include_usage` sends the usage in the last chunk".into() });
            }
        }
        Ok(ValidRequest {
            requests,
            prompt_texts,
            n,
            stream,
            include_usage: stream && params.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            logprobs,
            echo,
            tool_format: None,
            parallel_tool_calls: true,
        })
    }

    /// The prompt must leave room for at least one token; `max_tokens` defaults to the rest of the
    /// context and may not exceed it.
    fn fit(
        &self,
        prompt_len: usize,
        max_tokens: Option<u64>,
        prompt_field: &'static str,
        max_tokens_field: &'static str,
    ) -> Result<usize, ValidationError> {
        let max_len = self.max_model_len;
        if prompt_len == 0 {
            return Err(invalid(prompt_field, "must not be empty"));
        }
        if prompt_len >= max_len {
            return Err(ValidationError::ContextLength {
                field: prompt_field,
                message: format!(
                    "This model's maximum context length is {max_len} tokens. However, your request has \
                     {prompt_len} input tokens. Please reduce the length of the input."
                ),
            });
        }
        match max_tokens {
            None => Ok(max_len - prompt_len),
            // Checked: a client's 2^64 - 1 must not wrap into something that fits.
            Some(m) if (prompt_len as u64).checked_add(m).is_none_or(|total| total > max_len as u64) => {
                Err(ValidationError::ContextLength {
                    field: max_tokens_field,
                    message: format!(
                        "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                         ({prompt_len} in the input, {m} in the completion). Please reduce the length of the input \
                         or `{max_tokens_field}`.",
                        (prompt_len as u128) + m as u128
                    ),
                })
            }
            Some(m) => Ok(m as usize),
        }
    }

    fn sampling(&self, p: &GenerationParams, logprobs: Option<usize>) -> Result<SamplingParams, ValidationError> {
        let defaults = SamplingParams::default();
        let top_k = match p.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => return Err(invalid("top_k", format!("must be -1 (no limit) or at least 1, got {k}"))),
        };
        let mut logit_bias = std::collections::BTreeMap::new();
        for (key, &bias) in p.logit_bias.iter().flatten() {
            let token: u32 =
                key.trim().parse().map_err(|_| invalid("logit_bias", format!("keys must be token ids, got {key:?}")))?;
            logit_bias.insert(token, bias);
        }
        let sampling = SamplingParams {
            temperature: p.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: p.top_p.unwrap_or(defaults.top_p),
            min_p: p.min_p.unwrap_or(defaults.min_p),
            presence_penalty: p.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: p.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            repetition_penalty: p.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: p.seed.map(|s| s as u64),
            logit_bias,
            logprobs,
        };
        sampling.validate(self.vocab_size)?;
        Ok(sampling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_json;
    use crate::tokenizer::gguf::token_type;
    use crate::tokenizer::GgufTokenizerSpec;

    /// A byte-level tokenizer with no merges: one token per byte after two control tokens, and a
    /// chat template.
    fn validator(max_model_len: usize) -> Validator {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let byte_char = |b: u8| {
            if printable(b) {
                char::from(b)
            } else {
                char::from_u32(256 + (0..b).filter(|&x| !printable(x)).count() as u32).unwrap()
            }
        };
        let mut tokens = vec!["<|end|>".to_string(), "<|start|>".to_string()];
        tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
        let mut token_types = vec![token_type::CONTROL; 2];
        token_types.extend([token_type::NORMAL; 256]);
        let spec = GgufTokenizerSpec {
            model: "gpt2".into(),
            pre: Some("default".into()),
            tokens,
            token_types,
            eos_token_id: Some(0),
            bos_token_id: Some(1),
            add_bos_token: Some(false),
            chat_template: Some("{% for m in messages %}<|start|>{{ m.content }}<|end|>{% endfor %}".into()),
            ..Default::default()
        };
        let tokenizer = Tokenizer::from_gguf_spec(&spec).unwrap();
        Validator::new(Arc::new(tokenizer), max_model_len, 258)
    }

    fn completion(v: &Validator, json: &str) -> Result<ValidRequest, ValidationError> {
        v.completion(parse_json(json.as_bytes()).unwrap())
    }

    fn chat(v: &Validator, json: &str) -> Result<ValidRequest, ValidationError> {
        v.chat(parse_json(json.as_bytes()).unwrap())
    }

    #[test]
    fn limits_and_defaults() {
        let v = validator(16);
        let r = completion(&v, r#"{"prompt": "abcd"}"#).unwrap();
        assert_eq!(r.requests[0].prompt_tokens.len(), 4);
        assert_eq!(r.requests[0].max_tokens, 12, "default: the rest of the context");
        assert_eq!(r.requests[0].sampling.temperature, 1.0);
        let r = completion(&v, r#"{"prompt": ["ab", "c"], "n": 3, "max_tokens": 5, "stop": "x", "top_k": -1}"#).unwrap();
        assert_eq!((r.requests.len(), r.n, r.num_choices()), (2, 3, 6));
        assert_eq!(r.requests[1].stop, ["x"]);
        assert_eq!(r.requests[1].sampling.top_k, 0);

        let e = completion(&v, r#"{"prompt": "abcd", "max_tokens": 13}"#).unwrap_err();
        assert_eq!(e.field(), "max_tokens");
        assert!(e.to_string().contains("maximum context length is 16 tokens"), "{e}");
        assert!(e.to_string().contains("17 tokens (4 in the input, 13 in the completion)"), "{e}");
        assert_eq!(completion(&v, r#"{"prompt": "0123456789abcdef"}"#).unwrap_err().field(), "prompt");
        assert_eq!(completion(&v, r#"{"prompt": ""}"#).unwrap_err().field(), "prompt");
        assert_eq!(completion(&v, r#"{"prompt": [[]]}"#).unwrap_err().field(), "prompt");
        assert_eq!(completion(&v, r#"{"prompt": [300]}"#).unwrap_err().field(), "prompt");
        assert_eq!(completion(&v, r#"{"prompt": "a", "max_tokens": 0}"#).unwrap_err().field(), "max_tokens");
    }

    #[test]
    fn every_error_names_its_field() {
        let v = validator(64);
        for (json, field) in [
            (r#"{"prompt": "a", "top_p": 1.5}"#, "top_p"),
            (r#"{"prompt": "a", "temperature": 3}"#, "temperature"),
            (r#"{"prompt": "a", "top_k": -2}"#, "top_k"),
            (r#"{"prompt": "a", "n": 17}"#, "n"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "max_tokens": 18446744073709551615}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 18446744073709551614}"#, "max_tokens"),
            (r#"{"prompt": "a", "stop": ["1","2","3","4","5","6","7","8","9"]}"#, "stop"),
            (r#"{"prompt": "a", "stop": [""]}"#, "stop"),
            (r#"{"prompt": "a", "stop_token_ids": [999]}"#, "stop_token_ids"),
            (r#"{"prompt": "a", "logit_bias": {"x": 1}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"999": 1}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logprobs": 6}"#, "logprobs"),
            (r#"{"prompt": "a", "echo": true, "logprobs": 1}"#, "echo"),
            (r#"{"prompt": "a", "suffix": "z"}"#, "suffix"),
            (r#"{"prompt": "a", "sampler": "mirostat"}"#, "sampler"),
            (r#"{"prompt": "a", "constraint": "regex"}"#, "constraint"),
            (r#"{"prompt": "a", "constraint": {"config": {"pattern": "a"}}}"#, "constraint"),
            (r#"{"prompt": "a", "constraint": {"name": "regex", "pattern": "a"}}"#, "constraint"),
            (r#"{"prompt": "a", "constraint": 5}"#, "constraint"),
            (r#"{"prompt": "a", "constraint": "regex", "guided_regex": "a"}"#, "constraint"),
            (r#"{"prompt": "a", "response_format": {"type": "xml"}}"#, "response_format"),
            (r#"{"prompt": "a", "response_format": {"type": "json_schema"}}"#, "response_format"),
            (r#"{"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}"#, "tools"),
            (r#"{"prompt": "a", "tool_choice": "required"}"#, "tool_choice"),
            (r#"{"prompt": "a", "guided_regex": 5}"#, "guided_regex"),
            (r#"{"prompt": "a", "guided_choice": []}"#, "guided_choice"),
            (r#"{"prompt": "a", "structured_outputs": {"choice": ["a"], "regex": "a"}}"#, "structured_outputs"),
            (r#"{"prompt": "a", "structured_outputs": {"pattern": "a"}}"#, "structured_outputs"),
            (r#"{"prompt": "a", "guided_regex": "a", "response_format": {"type": "json_object"}}"#, "guided_regex"),
            (r#"{"prompt": "a", "min_tokens": 5}"#, "min_tokens"),
            (r#"{"prompt": "a", "use_beam_search": true}"#, "use_beam_search"),
            (r#"{"prompt": "a", "bad_words": ["x"]}"#, "bad_words"),
            (r#"{"prompt": "a", "chat_template": "{{ messages }}"}"#, "chat_template"),
            (r#"{"prompt": "a", "chat_template_kwargs": {"enable_thinking": false}}"#, "chat_template_kwargs"),
            (r#"{"prompt": "a", "continue_final_message": true}"#, "continue_final_message"),
        ] {
            let e = completion(&v, json).unwrap_err();
            assert_eq!(e.field(), field, "{json}: {e}");
            assert!(e.to_string().contains(field) || field == "sampler", "{json}: {e}");
        }
        let e = completion(&v, r#"{"prompt": "a", "sampler": "mirostat"}"#).unwrap_err();
        assert_eq!(e.to_string(), "no sampler plugin named mirostat is loaded");
    }

    #[test]
    fn fields_that_ask_for_nothing_are_accepted() {
        let v = validator(64);
        for json in [
            r#"{"prompt": "a", "response_format": {"type": "text"}}"#,
            r#"{"prompt": "a", "tools": [], "tool_choice": "none"}"#,
            r#"{"prompt": "a", "tools": null, "min_tokens": 0, "use_beam_search": false, "length_penalty": 1.0}"#,
        ] {
            completion(&v, json).unwrap_or_else(|e| panic!("{json}: {e}"));
        }
    }

    #[test]
    fn structured_output_fields_compile_to_a_constraint() {
        use crate::constraint::ConstraintSpec;
        let v = validator(64);
        for (json, want) in [
            (r#"{"prompt": "a", "response_format": {"type": "json_object"}}"#, ConstraintSpec::JsonObject),
            (r#"{"prompt": "a", "guided_regex": "[0-9]+"}"#, ConstraintSpec::Regex("[0-9]+".into())),
            (r#"{"prompt": "a", "structured_outputs": {"choice": ["x", "y"]}}"#, ConstraintSpec::Choice(vec!["x".into(), "y".into()])),
            (r#"{"prompt": "a", "guided_json": "{\"type\": \"integer\"}"}"#, ConstraintSpec::JsonSchema(serde_json::json!({"type": "integer"}))),
        ] {
            let r = completion(&v, json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(r.requests[0].constraint.as_ref().map(|c| c.spec().clone()), Some(want), "{json}");
        }
        let e = completion(&v, r#"{"prompt": "a", "guided_regex": "("}"#).unwrap_err();
        assert_eq!(e.field(), "guided_regex", "a regex that does not compile: {e}");
        assert!(completion(&v, r#"{"prompt": "a"}"#).unwrap().requests[0].constraint.is_none());
    }

    #[test]
    fn chat_requests() {
        let v = validator(64);
        let r = chat(&v, r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 5,
                             "logprobs": true, "top_logprobs": 2}"#)
        .unwrap();
        assert_eq!(r.requests[0].prompt_tokens, [1, 2 + b'h' as u32, 2 + b'i' as u32, 0]);
        assert_eq!(r.requests[0].max_tokens, 5, "max_completion_tokens wins");
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(r.requests[0].sampling.logprobs, Some(2));
        let e = chat(&v, r#"{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}"#).unwrap_err();
        assert_eq!(e.field(), "top_logprobs");
        let e = chat(&v, r#"{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}"#).unwrap_err();
        assert_eq!(e.field(), "max_completion_tokens");
        assert_eq!(chat(&v, r#"{"messages": []}"#).unwrap_err().field(), "messages");
    }

    #[test]
    fn chat_roles_are_checked_and_text_parts_joined() {
        let messages: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]"#,
        )
        .unwrap();
        let out = text_messages(&messages).unwrap();
        assert_eq!(out[1].content, ChatContent::Text("one\ntwo".into()));
        assert_eq!(out[0], messages[0]);
        for (json, wanted) in [
            (r#"[{"role": "wizard", "content": "hi"}]"#, "[0].role `wizard`"),
            (r#"[{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]"#, "[1].content[0] has type `image_url`"),
            (r#"[{"role": "user", "content": [{"type": "text"}]}]"#, "[0].content[0] is a text part without `text`"),
        ] {
            let messages: Vec<ChatMessage> = serde_json::from_str(json).unwrap();
            let e = text_messages(&messages).unwrap_err();
            assert_eq!(e.field(), "messages");
            assert!(e.to_string().contains(wanted), "{e}");
        }
    }

    /// Every number a client sends, at its extremes: a clean answer naming the field (from the
    /// parser or the validator) or an accepted request, never a wrap or a panic.
    #[test]
    fn client_numbers_at_their_extremes_never_wrap() {
        let v = validator(64);
        let extremes = ["0", "1", "-1", "4294967295", "4294967296", "18446744073709551615", "-9223372036854775808", "1e308", "-1e308", "0.5"];
        let fields = [
            "max_tokens", "max_completion_tokens", "n", "best_of", "logprobs", "top_k", "seed", "priority", "temperature", "top_p",
            "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
        ];
        for field in fields {
            for value in extremes {
                let json = format!(r#"{{"prompt": "a", "{field}": {value}}}"#);
                let request: Result<CompletionRequest, _> = parse_json(json.as_bytes());
                match request {
                    Err(e) => assert_eq!(e.param.as_deref(), Some(field), "{json}: {}", e.message),
                    Ok(request) => match v.completion(request) {
                        Ok(valid) => assert!(valid.requests[0].max_tokens + valid.requests[0].prompt_tokens.len() <= 64, "{json}"),
                        Err(e) => assert_eq!(e.field(), field, "{json}: {e}"),
                    },
                }
            }
        }
        for value in extremes {
            let json = format!(r#"{{"prompt": "a", "logit_bias": {{"5": {value}}}}}"#);
            if let Ok(request) = parse_json::<CompletionRequest>(json.as_bytes()) {
                if let Err(e) = v.completion(request) {
                    assert_eq!(e.field(), "logit_bias", "{json}: {e}");
                }
            }
            let json = format!(r#"{{"messages": [{{"role": "user", "content": "a"}}], "logprobs": true, "top_logprobs": {value}}}"#);
            if let Ok(request) = parse_json::<ChatCompletionRequest>(json.as_bytes()) {
                if let Err(e) = v.chat(request) {
                    assert_eq!(e.field(), "top_logprobs", "{json}: {e}");
                }
            }
        }
    }
}
