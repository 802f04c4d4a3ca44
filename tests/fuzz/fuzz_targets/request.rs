//! A request body from arbitrary bytes, through what the server runs on every generation request:
//! `api::parse_json` into a completion and a chat request, then the `Validator` (tokenizing,
//! the chat template, tools, grammars for structured outputs) with the default model's tokenizer.
//! Whatever is accepted must be a request the engine can run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedserve::api::{self, ChatCompletionRequest, CompletionRequest};
use pagedserve::sampling::MAX_LOGPROBS;
use pagedserve::validation::{ValidRequest, Validator, MAX_N};
use pagedserve_fuzz::default_tokenizer;

const MAX_MODEL_LEN: usize = 2048;

fn validator() -> &'static Validator {
    static VALIDATOR: std::sync::OnceLock<Validator> = std::sync::OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let tokenizer = default_tokenizer().clone();
        let vocab = tokenizer.vocab_size();
        Validator::new(tokenizer, MAX_MODEL_LEN, vocab)
    })
}

fn check(valid: &ValidRequest) {
    let vocab = validator().tokenizer().vocab_size();
    assert!(valid.n >= 1 && valid.n <= MAX_N);
    assert!(!valid.requests.is_empty());
    assert!(valid.logprobs.is_none_or(|k| k <= MAX_LOGPROBS));
    for r in &valid.requests {
        assert!(!r.prompt_tokens.is_empty(), "an empty prompt was accepted");
        assert!(r.prompt_tokens.iter().all(|&t| (t as usize) < vocab), "a token outside the vocabulary");
        assert!(r.max_tokens >= 1, "max_tokens 0 was accepted");
        let total = r.prompt_tokens.len().checked_add(r.max_tokens).expect("the length check overflowed");
        assert!(total <= MAX_MODEL_LEN, "{} + {} tokens exceed the context", r.prompt_tokens.len(), r.max_tokens);
        let s = &r.sampling;
        assert!(s.temperature.is_finite() && s.temperature >= 0.0, "temperature {}", s.temperature);
        assert!(s.top_p > 0.0 && s.top_p <= 1.0, "top_p {}", s.top_p);
        assert!((0.0..=1.0).contains(&s.min_p), "min_p {}", s.min_p);
        assert!((-2.0..=2.0).contains(&s.presence_penalty) && (-2.0..=2.0).contains(&s.frequency_penalty));
        assert!(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0);
        assert!(s.logit_bias.iter().all(|(&t, b)| (t as usize) < vocab && b.is_finite()));
        assert!(r.stop_token_ids.iter().all(|&t| (t as usize) < vocab));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = api::parse_json::<CompletionRequest>(data) {
        if let Ok(valid) = validator().completion(request) {
            check(&valid);
        }
    }
    if let Ok(request) = api::parse_json::<ChatCompletionRequest>(data) {
        if let Ok(valid) = validator().chat(request) {
            check(&valid);
        }
    }
});
