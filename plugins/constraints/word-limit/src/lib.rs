//! Word limit: the output ends after N words. Words are maximal runs of non-whitespace bytes of
//! the generated text (ASCII whitespace separates them; the prompt does not count).
//!
//! Request configuration (JSON, required): `{"words": N}` with N >= 1; a missing or invalid one
//! fails the request at `start`. No operator configuration (`""` or `{}`).
//!
//! While words remain, any token is allowed that does not begin more words than remain: so once
//! the Nth word has begun, tokens that continue it or add only whitespace (and EOS) are allowed,
//! and a token with whitespace followed by more text (a word N + 1) is not; a token that would
//! begin several words at once counts them all. Once the Nth word is complete (whitespace followed
//! it), or has gone on for `LAST_WORD_TOKENS` tokens after the one that began it, only EOS is: the
//! output never has more than N words, and it ends (a model may otherwise continue its last word
//! without end, "old*****...", since no whitespace ever comes).
//!
//! A mask depends only on whether the text ends inside a word and on how many words remain, so
//! masks are cached by that; with more words left than any token can begin, it is "all".
//!
//! A sequence whose tokens the plugin cannot all see (after a fault, a fresh instance starts it
//! again, and the step keeps only its last 64 tokens) can no longer be counted: it gets EOS only,
//! and a warning in the log, rather than an error that would fail every sequence of the call.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::constraint::{
    self, export_constraint, MaskCache, mask_where, new_tokens, only, token_bytes, ConstraintRequest, ConstraintStep, Guest,
    TokenMask,
};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    pub words: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
struct NoConfig {}

/// The word limit a request's configuration sets.
pub fn parse_request(config: &str) -> Result<u32, String> {
    const EXPECTED: &str = r#"expected {"words": N} with N >= 1"#;
    let config: Config = pagedserve_plugin_sdk::serde_json::from_str(config)
        .map_err(|e| format!("invalid word-limit configuration ({e}): {EXPECTED}"))?;
    if config.words == 0 {
        return Err(format!("invalid word-limit configuration (0 words): {EXPECTED}"));
    }
    Ok(config.words)
}

/// ASCII whitespace, vertical tab included (what `str::split_whitespace` splits ASCII text at).
pub fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// The words `bytes` begins after text that ends inside a word (`in_word`) or not.
pub fn starts(bytes: &[u8], mut in_word: bool) -> u32 {
    let mut count = 0;
    for &byte in bytes {
        let space = is_space(byte);
        if !space && !in_word {
            count += 1;
        }
        in_word = !space;
    }
    count
}

/// Where a text stands: the words it has begun, and whether it ends inside one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Words {
    pub started: u32,
    pub in_word: bool,
}

impl Words {
    /// Where the text stands once `bytes` follow it.
    pub fn after(self, bytes: &[u8]) -> Words {
        let started = self.started.saturating_add(starts(bytes, self.in_word));
        let in_word = bytes.last().map_or(self.in_word, |&b| !is_space(b));
        Words { started, in_word }
    }

    /// Words followed by whitespace.
    pub fn complete(self) -> u32 {
        self.started - self.in_word as u32
    }
}

/// The most words any token of the vocabulary begins (after whitespace, where it begins most).
pub fn max_starts(vocab: &[Vec<u8>]) -> u32 {
    vocab.iter().map(|bytes| starts(bytes, false)).max().unwrap_or(0)
}

/// The tokens allowed after a text standing at `words`, for a limit of `limit` words.
pub fn mask(vocab: &[Vec<u8>], limit: u32, words: Words, vocab_size: u32, eos: u32) -> TokenMask {
    if words.complete() >= limit || words.started > limit {
        return only(&[eos]);
    }
    let remaining = limit - words.started;
    mask_where(vocab_size, |token| token == eos || starts(token_bytes(vocab, token), words.in_word) <= remaining)
}

/// Tokens the last word may take after the one that began it.
pub const LAST_WORD_TOKENS: u32 = 4;

#[derive(Debug, Clone)]
struct Seq {
    limit: u32,
    words: Words,
    /// Tokens taken since the Nth word began (that one included).
    last_word_tokens: u32,
    /// Generated tokens already counted in `words`.
    consumed: u32,
    vocab_size: u32,
    eos: u32,
}

/// The live sequences and the masks computed so far: the plugin's logic, over a vocabulary it is
/// given.
#[derive(Debug, Default)]
pub struct WordLimit {
    seqs: BTreeMap<u64, Seq>,
    /// By (ends inside a word, words remaining, vocab-size, eos).
    masks: MaskCache<(bool, u32, u32, u32)>,
    max_starts: Option<u32>,
    /// For the log (the logic runs natively in tests, where the host's log cannot be called).
    warnings: Vec<String>,
}

impl WordLimit {
    pub fn start(&mut self, req: &ConstraintRequest) -> Result<(), String> {
        let limit = parse_request(&req.config)?;
        let seq = Seq { limit, words: Words::default(), last_word_tokens: 0, consumed: 0, vocab_size: req.vocab_size, eos: req.eos_token };
        self.seqs.insert(req.id, seq);
        Ok(())
    }

    /// Counts the words of the tokens the sequence took, and answers its mask.
    pub fn next(&mut self, step: &ConstraintStep, vocab: &[Vec<u8>]) -> Result<TokenMask, String> {
        let seq = self.seqs.get_mut(&step.id).ok_or_else(|| format!("sequence {} was not started", step.id))?;
        match new_tokens(step, seq.consumed) {
            Ok(tokens) => {
                for &token in tokens {
                    if token != seq.eos {
                        seq.words = seq.words.after(token_bytes(vocab, token));
                        if seq.words.started >= seq.limit {
                            seq.last_word_tokens += 1;
                        }
                    }
                }
            }
            Err(lost) => {
                self.warnings.push(format!("{lost}: its words can no longer be counted, the output ends here"));
                seq.words = Words { started: seq.limit, in_word: false };
            }
        }
        seq.consumed = step.generated_tokens;
        let seq = seq.clone();
        if seq.words.complete() >= seq.limit || seq.words.started > seq.limit || seq.last_word_tokens > LAST_WORD_TOKENS {
            return Ok(only(&[seq.eos]));
        }
        let remaining = seq.limit - seq.words.started;
        if remaining >= *self.max_starts.get_or_insert_with(|| max_starts(vocab)) {
            return Ok(TokenMask::All);
        }
        let key = (seq.words.in_word, remaining, seq.vocab_size, seq.eos);
        Ok(self.masks.get_or_insert_with(key, || mask(vocab, seq.limit, seq.words, seq.vocab_size, seq.eos)))
    }

    pub fn end(&mut self, ids: &[u64]) {
        for id in ids {
            self.seqs.remove(id);
        }
    }

    /// The warnings since the last call, for the log.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

static STATE: Mutex<Option<WordLimit>> = Mutex::new(None);

struct Plugin;

impl Guest for Plugin {
    fn configure(config: String) -> Result<(), String> {
        pagedserve_plugin_sdk::parse_config::<NoConfig>(&config)
            .map_err(|e| format!("the word-limit constraint takes no operator configuration: {e}"))?;
        // The vocabulary's copy now, under the setup deadline, rather than in the first step's.
        constraint::vocabulary();
        Ok(())
    }

    fn start(req: ConstraintRequest) -> Result<(), String> {
        STATE.lock().unwrap().get_or_insert_with(WordLimit::default).start(&req)
    }

    fn next(steps: Vec<ConstraintStep>) -> Result<Vec<TokenMask>, String> {
        let mut state = STATE.lock().unwrap();
        let state = state.get_or_insert_with(WordLimit::default);
        let vocab = constraint::vocabulary();
        let masks = steps.iter().map(|step| state.next(step, vocab)).collect();
        for warning in state.take_warnings() {
            pagedserve_plugin_sdk::host::warn(&warning);
        }
        masks
    }

    fn end(ids: Vec<u64>) {
        if let Some(state) = STATE.lock().unwrap().as_mut() {
            state.end(&ids);
        }
    }
}

export_constraint!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 4;
    const SIZE: u32 = 11;

    /// 0 "Hello", 1 " world", 2 " ", 3 "!", 4 EOS, 5 " a b", 6 "ing ", 7 "\n", 8 "x y",
    /// 9 another special, and id 10 past the tokenizer's list.
    fn vocab() -> Vec<Vec<u8>> {
        ["Hello", " world", " ", "!", "", " a b", "ing ", "\n", "x y", ""].iter().map(|t| t.as_bytes().to_vec()).collect()
    }

    fn words_of(text: &str) -> Words {
        Words::default().after(text.as_bytes())
    }

    #[test]
    fn words_are_runs_of_non_whitespace() {
        assert_eq!(words_of(""), Words { started: 0, in_word: false });
        assert_eq!(words_of("  Hello"), Words { started: 1, in_word: true });
        assert_eq!(words_of("Hello,\tworld\n"), Words { started: 2, in_word: false });
        assert_eq!(words_of("Hello").after(b"ing").after(b" there"), Words { started: 2, in_word: true });
        assert_eq!(words_of("a b ").complete(), 2);
        assert_eq!(words_of("a b").complete(), 1);
        assert_eq!(starts(b" a b", true), 2);
        assert_eq!(starts(b"ing a", true), 1, "continuing a word begins none");
        assert_eq!(starts(b"ing a", false), 2);
        assert_eq!(max_starts(&vocab()), 2);
    }

    #[test]
    fn the_nth_word_may_go_on_but_no_word_may_follow_it() {
        let vocab = vocab();
        // Two words: "Hello world" has begun the second.
        let m = mask(&vocab, 2, words_of("Hello world"), SIZE, EOS);
        assert!(m.validate(SIZE).is_ok());
        assert_eq!(m.allowed(SIZE), vec![0, 2, 3, 4, 6, 7, 9, 10], "not \" world\", \" a b\" or \"x y\"");
        // Once it is followed by whitespace, only EOS.
        assert_eq!(mask(&vocab, 2, words_of("Hello world "), SIZE, EOS), only(&[EOS]));
        assert_eq!(mask(&vocab, 2, words_of("Hello world  a"), SIZE, EOS), only(&[EOS]), "past the limit: EOS");
        // With words to spare, only tokens that would begin too many are refused.
        assert_eq!(mask(&vocab, 2, words_of("Hello"), SIZE, EOS).allowed(SIZE), vec![0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(mask(&vocab, 1, words_of(""), SIZE, EOS).allowed(SIZE), vec![0, 1, 2, 3, 4, 6, 7, 9, 10]);
    }

    fn request(id: u64, config: &str) -> ConstraintRequest {
        ConstraintRequest { id, prompt_tokens: vec![0, 1, 2], config: config.into(), vocab_size: SIZE, eos_token: EOS }
    }

    fn step(id: u64, generated: &[u32]) -> ConstraintStep {
        let mut recent = vec![0, 1, 2]; // the prompt: its words do not count
        recent.extend(generated);
        let recent_tokens = recent[recent.len().saturating_sub(64)..].to_vec();
        ConstraintStep { id, recent_tokens, generated_tokens: generated.len() as u32 }
    }

    #[test]
    fn outputs_never_exceed_the_limit_and_end_once_it_is_reached() {
        let vocab = vocab();
        for limit in 1..=4 {
            // Several sequences, each picking its tokens by its own rule among those allowed.
            for pick in 0..7usize {
                let mut p = WordLimit::default();
                p.start(&request(7, &format!(r#"{{"words": {limit}}}"#))).unwrap();
                let mut generated: Vec<u32> = Vec::new();
                let mut text = Vec::new();
                for round in 0..40 {
                    let m = p.next(&step(7, &generated), &vocab).unwrap();
                    assert!(m.validate(SIZE).is_ok());
                    let complete = words_of(std::str::from_utf8(&text).unwrap()).complete();
                    if complete >= limit {
                        assert_eq!(m, only(&[EOS]), "limit {limit}: {:?} is complete", String::from_utf8_lossy(&text));
                    }
                    let choices: Vec<u32> = m.allowed(SIZE).into_iter().filter(|&t| t != EOS || complete >= limit).collect();
                    let token = choices[(pick * 7 + round * 3) % choices.len()];
                    if token == EOS {
                        break;
                    }
                    generated.push(token);
                    text.extend(token_bytes(&vocab, token));
                }
                let text = String::from_utf8(text).unwrap();
                assert!(text.split_ascii_whitespace().count() as u32 <= limit, "limit {limit}: {text:?}");
            }
        }
    }

    #[test]
    fn a_last_word_that_goes_on_and_on_is_ended() {
        let vocab = vocab();
        let mut p = WordLimit::default();
        p.start(&request(1, r#"{"words": 1}"#)).unwrap();
        // "Hello" then "!" forever: never whitespace, so the word never completes.
        let mut generated = vec![0];
        for _ in 0..LAST_WORD_TOKENS {
            assert!(p.next(&step(1, &generated), &vocab).unwrap().allows(3), "the word may go on for a while");
            generated.push(3);
        }
        assert_eq!(p.next(&step(1, &generated), &vocab).unwrap(), only(&[EOS]), "then it ends");
    }

    #[test]
    fn masks_are_cached_and_all_while_no_token_can_overshoot() {
        let vocab = vocab();
        let mut p = WordLimit::default();
        p.start(&request(1, r#"{"words": 5}"#)).unwrap();
        assert_eq!(p.next(&step(1, &[]), &vocab).unwrap(), TokenMask::All, "5 words left, a token begins at most 2");
        p.start(&request(2, r#"{"words": 2}"#)).unwrap();
        p.start(&request(3, r#"{"words": 2}"#)).unwrap();
        let a = p.next(&step(2, &[0, 1]), &vocab).unwrap();
        let b = p.next(&step(3, &[8]), &vocab).unwrap();
        assert_eq!(a, b, "both in their second word");
        assert_eq!(p.masks.len(), 1);
        p.end(&[2, 3]);
        assert!(p.next(&step(2, &[0, 1, 2]), &vocab).unwrap_err().contains("not started"));
    }

    #[test]
    fn a_sequence_with_tokens_lost_past_the_recent_window_can_only_end() {
        let vocab = vocab();
        let mut p = WordLimit::default();
        p.start(&request(1, r#"{"words": 50}"#)).unwrap();
        assert_eq!(p.next(&step(1, &[3; 80]), &vocab).unwrap(), only(&[EOS]));
        assert!(p.take_warnings()[0].contains("only the last 64 are known"));
        assert_eq!(p.next(&step(1, &[3; 81]), &vocab).unwrap(), only(&[EOS]));
    }

    #[test]
    fn a_missing_or_invalid_limit_fails_start() {
        let mut p = WordLimit::default();
        let configs = ["", "{}", r#"{"words": 0}"#, r#"{"words": -3}"#, r#"{"words": "five"}"#, r#"{"words": 2, "chars": 9}"#];
        for config in configs {
            let e = p.start(&request(1, config)).unwrap_err();
            assert!(e.contains(r#"expected {"words": N} with N >= 1"#), "{config}: {e}");
        }
        assert!(p.seqs.is_empty());
        assert_eq!(parse_request(r#"{"words": 12}"#), Ok(12));
    }
}
