//! `/v1/completions` and `/v1/chat/completions`: parse, validate, submit one engine request per
//! prompt, then merge their event streams into the response's choices (`index = prompt * n +
//! sample`), as one JSON body or as SSE chunks (`data: {chunk}\n\n` ... `data: [DONE]\n\n`).
//!
//! A `Generation` owns the engine streams; dropping it (client gone, handler cancelled, response
//! body dropped) aborts every engine request it still has.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};

use super::body::RequestBody;
use super::error::ApiError;
use super::render::{chat_logprobs, push_completion_logprobs, response_id, stop_reason_json};
use super::{unix_now, AppState};
use crate::api::{
    self, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprob, ChatLogprobs, ChatMessageOut, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
    CompletionResponse, FunctionCallChunk, FunctionCallOut, ToolCallChunk, ToolCallOut, UsageInfo,
};
use crate::engine::{EngineError, FinishReason, RequestId, StreamEvent};
use crate::plugin::{FilterParams, FilterRequest, FilterVerdict, PluginRegistry};
use crate::sampling::Sampled;
use crate::tool_calls::{ToolCallDelta, ToolCallParser};
use crate::validation::ValidRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: RequestBody) -> Response {
    respond(state, Kind::Completion, headers, body).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: RequestBody) -> Response {
    respond(state, Kind::Chat, headers, body).await
}

async fn respond(state: Arc<AppState>, kind: Kind, headers: HeaderMap, body: RequestBody) -> Response {
    match Generation::start(state.clone(), kind, &headers, body).await {
        Ok(generation) if generation.valid.stream => generation.into_sse(),
        // Failures after the start were counted and logged where they happened.
        Ok(generation) => generation.collect().await.unwrap_or_else(IntoResponse::into_response),
        Err(error) => {
            state.metrics.request_failure.with_label_values(&[error.label]).inc();
            tracing::info!(status = error.status.as_u16(), param = error.param.as_deref(), "request refused: {}", error.message);
            error.into_response()
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, StreamEvent)> + Send>>;

#[derive(Default)]
struct ChoiceState {
    text: String,
    num_chars: usize,
    completion_logprobs: CompletionLogprobs,
    chat_logprobs: Vec<ChatLogprob>,
    finish: Option<FinishReason>,
    stop_reason: Option<serde_json::Value>,
    started: bool,
    /// The generated text so far (without the echoed prompt), for output filters.
    filter_text: String,
    generated_tokens: u32,
    /// Chat with tools: splits the output into content and tool calls.
    tool_parser: Option<ToolCallParser>,
}

impl ChoiceState {
    /// Whether the answer is tool calls: streamed once a call has begun; whole once every call
    /// parsed (an invalid call is returned as text).
    fn made_tool_calls(&self, stream: bool) -> bool {
        self.tool_parser.as_ref().is_some_and(|p| if stream { p.started_calls() } else { p.calls().is_some() })
    }
}

/// What the merged streams produced next.
enum Update {
    Delta { choice: usize, text: String, sampled: Vec<Sampled>, offset: usize, calls: Vec<ToolCallDelta> },
    Finished { choice: usize },
    AllDone,
}

struct Generation {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    valid: ValidRequest,
    events: SelectAll<EventStream>,
    choices: Vec<ChoiceState>,
    usage: UsageInfo,
    prompts_done: usize,
    started: Instant,
    over: bool,
    /// The plugin registry when any filter is loaded.
    plugins: Option<Arc<PluginRegistry>>,
    /// The engine's ids of this generation's requests (one per prompt).
    request_ids: Vec<RequestId>,
    /// Updates decided ahead (an output filter's stop), returned before reading the engine.
    pending: VecDeque<Update>,
}

/// A parsed request, kept so that filters' changes can be applied and validated again.
#[derive(Clone)]
enum Parsed {
    Completion(CompletionRequest),
    Chat(ChatCompletionRequest),
}

impl Parsed {
    /// Parses a request body as `kind` and validates it (tokenizing, rendering the chat template,
    /// compiling grammars): CPU work, run on the bounded pool (`AppState::run_blocking`).
    async fn parse_and_validate(state: &Arc<AppState>, kind: Kind, body: RequestBody) -> Result<(Parsed, ValidRequest), ApiError> {
        state
            .run_blocking(move |state| {
                let parsed = match kind {
                    Kind::Completion => Parsed::Completion(api::parse_json(&body.0)?),
                    Kind::Chat => Parsed::Chat(api::parse_json(&body.0)?),
                };
                let valid = parsed.validate(state)?;
                Ok((parsed, valid))
            })
            .await?
    }

    /// `validate` on the bounded pool.
    async fn validate_off_workers(&self, state: &Arc<AppState>) -> Result<ValidRequest, ApiError> {
        let parsed = self.clone();
        state.run_blocking(move |state| parsed.validate(state)).await?
    }

    fn validate(&self, state: &AppState) -> Result<ValidRequest, ApiError> {
        Ok(match self {
            Parsed::Completion(request) => {
                state.check_model(request.params.model.as_deref())?;
                state.validator.completion(request.clone())?
            }
            Parsed::Chat(request) => {
                state.check_model(request.params.model.as_deref())?;
                state.validator.chat(request.clone())?
            }
        })
    }

    /// Writes the fields a filter changed (`before` → `after`) into the request's parameters.
    fn apply(&mut self, before: &FilterParams, after: &FilterParams) {
        let (params, chat_max) = match self {
            Parsed::Completion(r) => (&mut r.params, None),
            Parsed::Chat(r) => (&mut r.params, Some(&mut r.max_completion_tokens)),
        };
        if after.max_tokens != before.max_tokens {
            params.max_tokens = Some(after.max_tokens as u64);
            if let Some(max) = chat_max {
                *max = None;
            }
        }
        if after.temperature != before.temperature {
            params.temperature = Some(after.temperature);
        }
        if after.top_p != before.top_p {
            params.top_p = Some(after.top_p);
        }
        if after.top_k != before.top_k {
            params.top_k = Some(after.top_k as i64);
        }
        if after.seed != before.seed {
            params.seed = after.seed.map(|s| s as i64);
        }
        if after.priority != before.priority {
            params.priority = Some(after.priority);
        }
        if after.tenant != before.tenant {
            params.user = Some(after.tenant.clone());
        }
        if after.sampler != before.sampler {
            params.sampler = after.sampler.clone();
        }
    }
}

/// The parameters filters see: those of the first prompt's engine request (all prompts share them,
/// except `max_tokens` when it defaults to the rest of the context: the smallest is shown).
fn filter_params(valid: &ValidRequest) -> FilterParams {
    let first = &valid.requests[0];
    let max_tokens = valid.requests.iter().map(|r| r.max_tokens).min().unwrap_or(first.max_tokens);
    FilterParams {
        max_tokens: max_tokens.min(u32::MAX as usize) as u32,
        temperature: first.sampling.temperature,
        top_p: first.sampling.top_p,
        top_k: first.sampling.top_k.min(u32::MAX as usize) as u32,
        seed: first.sampling.seed,
        priority: first.priority,
        tenant: first.tenant.clone(),
        sampler: first.sampler.clone(),
    }
}

impl Generation {
    async fn start(state: Arc<AppState>, kind: Kind, headers: &HeaderMap, body: RequestBody) -> Result<Self, ApiError> {
        let started = Instant::now();
        let (mut parsed, mut valid) = Parsed::parse_and_validate(&state, kind, body).await?;
        let plugins = state.plugins.clone().filter(|p| !p.filters().is_empty());
        if let Some(registry) = &plugins {
            let before = filter_params(&valid);
            let request = FilterRequest {
                headers: headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_string())))
                    .collect(),
                prompt: valid.prompt_texts.join("\n"),
                params: before.clone(),
            };
            let registry = registry.clone();
            let outcome = tokio::task::spawn_blocking(move || registry.run_filters(&request))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("request filters: {e}"), None, "plugin"))?;
            match outcome? {
                (FilterVerdict::Continue, _) => {}
                (FilterVerdict::Reject { status, message }, plugin) => {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                    let plugin = plugin.unwrap_or_default();
                    return Err(ApiError::new(
                        status,
                        format!("request rejected by filter `{plugin}`: {message}"),
                        None,
                        "filter",
                    ));
                }
                (FilterVerdict::Modify(after), _) => {
                    // Apply what the filters changed, then validate the whole request again.
                    parsed.apply(&before, &after);
                    valid = parsed.validate_off_workers(&state).await?;
                }
            }
        }
        if valid.requests.len() > state.engine.max_queue() {
            // It could never be queued whole: busy (429) would tell the client to retry in vain.
            return Err(ApiError::bad_request(
                format!(
                    "a batch of {} prompts is more than the server queues at once ({}, --max-queue); send it in smaller batches",
                    valid.requests.len(),
                    state.engine.max_queue()
                ),
                Some("prompt"),
            ));
        }
        let mut events = SelectAll::new();
        let mut request_ids = Vec::with_capacity(valid.requests.len());
        for (prompt, request) in valid.requests.iter().enumerate() {
            // An error here drops the streams already submitted, which aborts them.
            let engine_stream = state.engine.submit(request.clone())?;
            request_ids.push(engine_stream.id);
            let tagged = stream::unfold(engine_stream, move |mut s| async move { s.next().await.map(|e| ((prompt, e), s)) });
            events.push(Box::pin(tagged) as EventStream);
        }
        let id = response_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
        let (tool_format, parallel) = (valid.tool_format, valid.parallel_tool_calls);
        let parser = |format| if parallel { ToolCallParser::new(format) } else { ToolCallParser::new(format).single_call() };
        let choices = (0..valid.num_choices())
            .map(|_| ChoiceState { tool_parser: tool_format.map(parser), ..ChoiceState::default() })
            .collect();
        Ok(Generation {
            state,
            kind,
            id,
            created: unix_now(),
            valid,
            events,
            choices,
            usage: UsageInfo::default(),
            prompts_done: 0,
            started,
            over: false,
            plugins,
            request_ids,
            pending: VecDeque::new(),
        })
    }

    /// Runs the output filters on choice `choice`'s text so far; on a `Stop`, ends the whole
    /// request: every unfinished choice finishes with `stop` (the filter's reason as
    /// `stop_reason`), and the engine streams are dropped, which aborts them.
    async fn check_output(&mut self, choice: usize) -> Result<(), ApiError> {
        let Some(registry) = self.plugins.clone() else { return Ok(()) };
        let c = &self.choices[choice];
        let (text, generated) = (c.filter_text.clone(), c.generated_tokens);
        let tenant = self.valid.requests.first().map(|r| r.tenant.clone()).unwrap_or_default();
        let verdict = tokio::task::spawn_blocking(move || registry.run_output_filters(&tenant, &text, generated))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("output filters: {e}"), None, "plugin"))?;
        let Some((plugin, reason)) = verdict? else { return Ok(()) };
        tracing::info!(id = %self.id, plugin = %plugin, reason = %reason, "output filter stopped the request");
        // Counted as stopped; dropping the streams after that is then a no-op for the engine.
        for &id in &self.request_ids {
            self.state.engine.stop(id);
        }
        self.events = SelectAll::new();
        for (index, c) in self.choices.iter_mut().enumerate() {
            if c.finish.is_none() {
                c.finish = Some(FinishReason::Stop);
                c.stop_reason = Some(serde_json::Value::String(reason.clone()));
                self.pending.push_back(Update::Finished { choice: index });
            }
        }
        // Prompts the engine had not finished: their prompt tokens and what they generated.
        let done = self.prompts_done;
        for (prompt, request) in self.valid.requests.iter().enumerate().skip(done) {
            self.usage.prompt_tokens += request.prompt_tokens.len();
            let generated: usize = (0..self.valid.n).map(|i| self.choices[prompt * self.valid.n + i].generated_tokens as usize).sum();
            self.usage.completion_tokens += generated;
        }
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
        self.over = true;
        self.log_done();
        self.pending.push_back(Update::AllDone);
        Ok(())
    }

    async fn next_update(&mut self) -> Result<Update, ApiError> {
        if let Some(update) = self.pending.pop_front() {
            return Ok(update);
        }
        loop {
            // Every engine stream ends with `Done` or `Error`; running dry first means the engine died.
            let (prompt, event) = self.events.next().await.unwrap_or((0, StreamEvent::Error(EngineError::Unavailable)));
            match event {
                StreamEvent::Delta { index, text, logprobs, token_ids } => {
                    let choice = prompt * self.valid.n + index;
                    let c = &mut self.choices[choice];
                    c.generated_tokens += token_ids.len() as u32;
                    if self.plugins.is_some() && !text.is_empty() {
                        c.filter_text.push_str(&text);
                        if let Err(error) = self.check_output(choice).await {
                            // Fail closed: the engine streams are dropped (aborted).
                            self.over = true;
                            self.events = SelectAll::new();
                            tracing::warn!(id = %self.id, error = %error.message, "output filter failed");
                            self.state.metrics.request_failure.with_label_values(&[error.label]).inc();
                            return Err(error);
                        }
                        if self.over {
                            // A filter stopped the request on this text: it is withheld, so a
                            // blocklisted word that completes here never reaches the client.
                            return Ok(self.pending.pop_front().expect("a stop queues the finish updates"));
                        }
                    }
                    let c = &mut self.choices[choice];
                    let mut text = text;
                    if !c.started {
                        c.started = true;
                        if self.valid.echo {
                            text.insert_str(0, &self.valid.prompt_texts[prompt]);
                        }
                    }
                    let mut calls = Vec::new();
                    if let Some(parser) = &mut c.tool_parser {
                        let parsed = parser.push(&text);
                        text = parsed.content;
                        calls = parsed.calls;
                    }
                    let offset = c.num_chars;
                    c.num_chars += text.chars().count();
                    if !self.valid.stream {
                        c.text.push_str(&text);
                        if self.valid.logprobs.is_some() {
                            match self.kind {
                                Kind::Completion => push_completion_logprobs(
                                    &self.state.tokenizer,
                                    &mut c.completion_logprobs,
                                    &logprobs,
                                    offset,
                                    &[text.as_str()],
                                ),
                                Kind::Chat => c.chat_logprobs.extend(chat_logprobs(&self.state.tokenizer, &logprobs)),
                            }
                        }
                    }
                    return Ok(Update::Delta { choice, text, sampled: logprobs, offset, calls });
                }
                StreamEvent::Finished { index, reason, stop_reason } => {
                    let choice = prompt * self.valid.n + index;
                    let c = &mut self.choices[choice];
                    c.finish = Some(reason);
                    c.stop_reason = stop_reason_json(stop_reason.as_ref());
                    // Text a tool-call parser held back goes out before the finish.
                    let rest = c.tool_parser.as_mut().map(ToolCallParser::finish).unwrap_or_default();
                    if rest.content.is_empty() && rest.calls.is_empty() {
                        return Ok(Update::Finished { choice });
                    }
                    let offset = c.num_chars;
                    c.num_chars += rest.content.chars().count();
                    if !self.valid.stream {
                        c.text.push_str(&rest.content);
                    }
                    self.pending.push_back(Update::Finished { choice });
                    return Ok(Update::Delta { choice, text: rest.content, sampled: Vec::new(), offset, calls: rest.calls });
                }
                StreamEvent::Done { usage, .. } => {
                    self.usage.prompt_tokens += usage.prompt_tokens;
                    self.usage.completion_tokens += usage.completion_tokens;
                    self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
                    self.prompts_done += 1;
                    if self.prompts_done == self.valid.requests.len() {
                        self.over = true;
                        self.log_done();
                        return Ok(Update::AllDone);
                    }
                }
                StreamEvent::Error(error) => {
                    self.over = true;
                    tracing::warn!(id = %self.id, %error, "request failed");
                    self.state.metrics.request_failure.with_label_values(&[error.label()]).inc();
                    return Err(error.into());
                }
            }
        }
    }

    fn log_done(&self) {
        let reasons: Vec<&str> = self.choices.iter().map(|c| c.finish.map_or("none", FinishReason::as_str)).collect();
        tracing::info!(
            id = %self.id,
            prompt_tokens = self.usage.prompt_tokens,
            completion_tokens = self.usage.completion_tokens,
            finish_reason = %reasons.join(","),
            stream = self.valid.stream,
            latency_ms = self.started.elapsed().as_millis() as u64,
            "request finished"
        );
    }

    fn finish_reason(&self, choice: usize) -> Option<String> {
        let c = &self.choices[choice];
        match c.finish? {
            FinishReason::Stop if c.made_tool_calls(self.valid.stream) => Some("tool_calls".into()),
            reason => Some(reason.as_str().to_string()),
        }
    }

    /// Non-streaming: waits for every choice, then answers once.
    async fn collect(mut self) -> Result<Response, ApiError> {
        while !matches!(self.next_update().await?, Update::AllDone) {}
        let model = self.state.model_name.clone();
        let finish_reasons: Vec<Option<String>> = (0..self.choices.len()).map(|c| self.finish_reason(c)).collect();
        let choices = std::mem::take(&mut self.choices);
        let body = match self.kind {
            Kind::Completion => Json(CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model,
                choices: choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| CompletionChoice {
                        index,
                        text: c.text,
                        logprobs: self.valid.logprobs.map(|_| c.completion_logprobs),
                        finish_reason: c.finish.map(|r| r.as_str().to_string()),
                        stop_reason: c.stop_reason,
                    })
                    .collect(),
                usage: self.usage,
            })
            .into_response(),
            Kind::Chat => Json(ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion".into(),
                created: self.created,
                model,
                choices: choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| ChatChoice {
                        index,
                        message: chat_message(&c),
                        logprobs: self.valid.logprobs.map(|_| ChatLogprobs { content: c.chat_logprobs }),
                        finish_reason: finish_reasons[index].clone(),
                        stop_reason: c.stop_reason,
                    })
                    .collect(),
                usage: self.usage,
            })
            .into_response(),
        };
        Ok(with_request_id(body, &self.id))
    }

    #[allow(clippy::too_many_arguments)]
    fn chunk(&self, choice: usize, text: Option<String>, calls: &[ToolCallDelta], sampled: &[Sampled], offset: usize, last: bool) -> Bytes {
        let finish_reason = if last { self.finish_reason(choice) } else { None };
        let stop_reason = if last { self.choices[choice].stop_reason.clone() } else { None };
        let json = match self.kind {
            Kind::Completion => {
                let logprobs = self.valid.logprobs.filter(|_| !last).map(|_| {
                    let mut lp = CompletionLogprobs::default();
                    let texts = [text.as_deref().unwrap_or("")];
                    push_completion_logprobs(&self.state.tokenizer, &mut lp, sampled, offset, &texts);
                    lp
                });
                serde_json::to_string(&CompletionChunk {
                    id: self.id.clone(),
                    object: "text_completion".into(),
                    created: self.created,
                    model: self.state.model_name.clone(),
                    choices: vec![CompletionChoice {
                        index: choice,
                        text: text.unwrap_or_default(),
                        logprobs,
                        finish_reason,
                        stop_reason,
                    }],
                    usage: None,
                })
            }
            Kind::Chat => {
                let logprobs = (self.valid.logprobs.is_some() && !last)
                    .then(|| ChatLogprobs { content: chat_logprobs(&self.state.tokenizer, sampled) });
                serde_json::to_string(&ChatCompletionChunk {
                    id: self.id.clone(),
                    object: "chat.completion.chunk".into(),
                    created: self.created,
                    model: self.state.model_name.clone(),
                    choices: vec![ChatChunkChoice {
                        index: choice,
                        delta: ChatDelta { role: None, content: text, tool_calls: calls.iter().map(tool_call_chunk).collect() },
                        logprobs,
                        finish_reason,
                        stop_reason,
                    }],
                    usage: None,
                })
            }
        };
        sse(&json.expect("chunks serialize"))
    }

    fn role_chunk(&self, choice: usize) -> Bytes {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.state.model_name.clone(),
            choices: vec![ChatChunkChoice {
                index: choice,
                delta: ChatDelta { role: Some("assistant".into()), content: Some(String::new()), tool_calls: Vec::new() },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            }],
            usage: None,
        };
        sse(&serde_json::to_string(&chunk).expect("chunks serialize"))
    }

    fn usage_chunk(&self) -> Bytes {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let json = serde_json::json!({
            "id": self.id, "object": object, "created": self.created, "model": self.state.model_name,
            "choices": [], "usage": self.usage,
        });
        sse(&json.to_string())
    }

    /// Streaming: the body owns the generation, so a client that disconnects aborts it.
    fn into_sse(self) -> Response {
        let id = self.id.clone();
        let mut queue = VecDeque::new();
        if self.kind == Kind::Chat {
            queue.extend((0..self.choices.len()).map(|c| self.role_chunk(c)));
        }
        let body = stream::unfold((self, queue, false), |(mut generation, mut queue, mut finished)| async move {
            loop {
                if let Some(bytes) = queue.pop_front() {
                    return Some((Ok::<_, Infallible>(bytes), (generation, queue, finished)));
                }
                if finished {
                    return None;
                }
                match generation.next_update().await {
                    Ok(Update::Delta { choice, text, sampled, offset, calls }) => {
                        if !calls.is_empty() {
                            // Content (if any) and tool-call pieces as separate deltas, in order.
                            if !text.is_empty() || generation.valid.logprobs.is_some() {
                                queue.push_back(generation.chunk(choice, Some(text), &[], &sampled, offset, false));
                            }
                            queue.push_back(generation.chunk(choice, None, &calls, &[], offset, false));
                        } else if !text.is_empty() || generation.valid.logprobs.is_some() {
                            queue.push_back(generation.chunk(choice, Some(text), &[], &sampled, offset, false));
                        }
                    }
                    Ok(Update::Finished { choice }) => {
                        let text = (generation.kind == Kind::Completion).then(String::new);
                        queue.push_back(generation.chunk(choice, text, &[], &[], 0, true));
                    }
                    Ok(Update::AllDone) => {
                        if generation.valid.include_usage {
                            queue.push_back(generation.usage_chunk());
                        }
                        queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        finished = true;
                    }
                    Err(error) => {
                        queue.push_back(sse(&serde_json::to_string(&error.body()).expect("errors serialize")));
                        queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        finished = true;
                    }
                }
            }
        });
        let mut response = Body::from_stream(body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        with_request_id(response, &id)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.over {
            tracing::info!(id = %self.id, latency_ms = self.started.elapsed().as_millis() as u64, "client went away; request aborted");
        }
    }
}

/// A whole chat answer: its content, or its tool calls (with the text before them as content),
/// as the streamed deltas give them (a call cut off by `max_tokens` dropped, markup no call came
/// of as content); output with a malformed call object is returned as text.
fn chat_message(c: &ChoiceState) -> ChatMessageOut {
    let assistant = |content: Option<String>, tool_calls| ChatMessageOut { role: "assistant".into(), content, tool_calls };
    match c.tool_parser.as_ref() {
        None => assistant(Some(c.text.clone()), Vec::new()),
        Some(parser) => match parser.calls() {
            Some(calls) => assistant(
                Some(c.text.clone()).filter(|t| !t.trim().is_empty()),
                calls
                    .iter()
                    .map(|call| ToolCallOut {
                        id: call.id.clone(),
                        kind: "function".into(),
                        function: FunctionCallOut { name: call.name.clone(), arguments: call.arguments.clone() },
                    })
                    .collect(),
            ),
            None if parser.malformed() => assistant(Some(parser.text().to_string()), Vec::new()),
            None => assistant(Some(c.text.clone()), Vec::new()),
        },
    }
}

fn tool_call_chunk(delta: &ToolCallDelta) -> ToolCallChunk {
    ToolCallChunk {
        index: delta.index,
        id: delta.id.clone(),
        kind: delta.id.as_ref().map(|_| "function".to_string()),
        function: FunctionCallChunk { name: delta.name.clone(), arguments: delta.arguments.clone() },
    }
}

fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
