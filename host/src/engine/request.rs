//! What goes into the engine (a validated `GenerateRequest`) and what comes out of it (a stream of
//! `StreamEvent`s per request). Both sides are plain data: the HTTP layer builds the first and
//! renders the second; the engine thread never sees HTTP and the server never sees the step loop.

use std::time::Duration;

use crate::constraint::Constraint;
use crate::sampling::{Sampled, SamplingParams};

pub type RequestId = u64;

/// A request that passed validation: tokens, limits and parameters are all in range.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate per sample.
    pub max_tokens: usize,
    /// Independent samples (they share the prompt's KV blocks).
    pub n: usize,
    /// Stop strings: generation ends when one appears; it is not part of the output unless
    /// `include_stop_str_in_output`.
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub include_stop_str_in_output: bool,
    /// Lower is more urgent (vLLM's convention).
    pub priority: i32,
    pub tenant: String,
    /// A sampler plugin to pick this request's tokens instead of the native sampler.
    pub sampler: Option<String>,
    /// What the output must match (structured outputs); each sample advances its own copy.
    pub constraint: Option<Constraint>,
}

impl GenerateRequest {
    /// A greedy request with everything else at its default.
    pub fn greedy(prompt_tokens: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt_tokens,
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            max_tokens,
            n: 1,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            include_stop_str_in_output: false,
            priority: 0,
            tenant: String::new(),
            sampler: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The client went away or the request was cancelled.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What made a sample stop with `FinishReason::Stop`, when it was not end-of-sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    String(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimings {
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// New output of sample `index`: the tokens just generated and the text they completed
    /// (text may lag tokens: incomplete characters and possible stop-string prefixes are held).
    Delta { index: usize, token_ids: Vec<u32>, text: String, logprobs: Vec<Sampled> },
    /// Sample `index` is complete; any text it held back came in its last `Delta`.
    Finished { index: usize, reason: FinishReason, stop_reason: Option<StopReason> },
    /// Every sample is complete; the stream ends after this.
    Done { usage: Usage, timings: RequestTimings },
    /// The request failed; the stream ends after this.
    Error(super::EngineError),
}
