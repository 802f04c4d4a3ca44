//! One sample's text as it streams: incremental detokenizing, then stop strings. Text that could
//! still become a stop string is held back, so stop text never reaches the client, even when it
//! spans several tokens; what is held back is released when it can no longer match.

use super::request::{FinishReason, StopReason};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};

/// Why a sample's new token ends it, as far as is known before its text: the end-of-sequence
/// token, one of the request's stop tokens, or its length (`max_tokens` or the model's length).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenEnds {
    pub eos: bool,
    pub stop_token: bool,
    pub length: bool,
}

/// What a sample's new token did: the text it released (or why detokenizing failed), and
/// whether and why the sample ended.
#[derive(Debug)]
pub struct TokenOutcome {
    pub delta: Result<TextDelta, TokenizerError>,
    /// Why the sample ended, and for `stop` what stopped it.
    pub finish: Option<(FinishReason, Option<StopReason>)>,
}

pub struct TextStream {
    detokenizer: IncrementalDetokenizer,
    stop: Vec<String>,
    include_stop: bool,
    /// Decoded text not yet released (a possible stop-string prefix).
    held: String,
}

/// What a new token produced.
#[derive(Debug, Default, PartialEq)]
pub struct TextDelta {
    pub text: String,
    /// The stop string that ended the sample, if one appeared.
    pub stopped_by: Option<String>,
}

impl TextStream {
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32], skip_special_tokens: bool, stop: Vec<String>, include_stop: bool) -> Self {
        TextStream {
            detokenizer: IncrementalDetokenizer::with_context(prompt, tokenizer, skip_special_tokens),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            include_stop,
            held: String::new(),
        }
    }

    /// Takes the sample's new `token`: its text, then why the sample ends, in order of
    /// precedence: the end-of-sequence token (which is not text of the answer) or a stop token,
    /// then a stop string in the text, then its length. A sample that ends other than by a stop
    /// string releases everything still held back (stop strings still honoured in that tail).
    pub fn take_token(&mut self, tokenizer: &Tokenizer, token: u32, ends: TokenEnds) -> TokenOutcome {
        let mut finish = if ends.eos {
            Some((FinishReason::Stop, None))
        } else if ends.stop_token {
            Some((FinishReason::Stop, Some(StopReason::Token(token))))
        } else {
            None
        };
        let mut delta = if ends.eos { Ok(TextDelta::default()) } else { self.push(tokenizer, token) };
        if let Ok(TextDelta { stopped_by: Some(stop), .. }) = &delta {
            finish = Some((FinishReason::Stop, Some(StopReason::String(stop.clone()))));
        }
        if finish.is_none() && ends.length {
            finish = Some((FinishReason::Length, None));
        }
        if finish.is_some() && delta.as_ref().is_ok_and(|d| d.stopped_by.is_none()) {
            match self.finish(tokenizer) {
                Ok(tail) => {
                    if let Ok(d) = &mut delta {
                        d.text.push_str(&tail.text);
                        if let Some(stop) = tail.stopped_by {
                            finish = Some((FinishReason::Stop, Some(StopReason::String(stop))));
                        }
                    }
                }
                Err(e) => delta = Err(e),
            }
        }
        TokenOutcome { delta, finish }
    }

    /// Adds a generated token; returns the text that is now safe to emit.
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<TextDelta, TokenizerError> {
        let new_text = self.detokenizer.step(tokenizer, token)?;
        Ok(self.release(new_text))
    }

    /// The sample ended for another reason: everything still held is emitted (stop strings are
    /// still honoured in the flushed tail).
    fn finish(&mut self, tokenizer: &Tokenizer) -> Result<TextDelta, TokenizerError> {
        let tail = self.detokenizer.finish(tokenizer)?;
        let mut delta = self.release(tail);
        if delta.stopped_by.is_none() {
            delta.text.push_str(&std::mem::take(&mut self.held));
        }
        Ok(delta)
    }

    fn release(&mut self, new_text: String) -> TextDelta {
        if self.stop.is_empty() {
            return TextDelta { text: new_text, stopped_by: None };
        }
        self.held.push_str(&new_text);
        // The earliest stop string in the held text wins.
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, s)| (at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = found {
            let end = if self.include_stop { at + stop.len() } else { at };
            let text = self.held[..end].to_string();
            let stop = stop.clone();
            self.held.clear();
            return TextDelta { text, stopped_by: Some(stop) };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stop.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_string();
        self.held.drain(..keep);
        TextDelta { text, stopped_by: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose detokenizer is bypassed: feeds text pieces straight into `release`.
    fn feed(stop: &[&str], include: bool, pieces: &[&str]) -> (String, Option<String>) {
        let mut stream = TextStream {
            detokenizer: IncrementalDetokenizer::new(true),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop: include,
            held: String::new(),
        };
        let mut out = String::new();
        for piece in pieces {
            let delta = stream.release(piece.to_string());
            out.push_str(&delta.text);
            if delta.stopped_by.is_some() {
                return (out, delta.stopped_by);
            }
        }
        out.push_str(&stream.held);
        (out, None)
    }

    #[test]
    fn stop_string_across_pieces_never_leaks() {
        assert_eq!(feed(&["END"], false, &["abc E", "N", "D tail"]), ("abc ".into(), Some("END".into())));
        assert_eq!(feed(&["END"], true, &["abc E", "ND"]), ("abc END".into(), Some("END".into())));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut stream = TextStream {
            detokenizer: IncrementalDetokenizer::new(true),
            stop: vec!["END".into()],
            include_stop: false,
            held: String::new(),
        };
        assert_eq!(stream.release("xE".into()).text, "x");
        assert_eq!(stream.release("Nx".into()).text, "ENx");
        assert_eq!(feed(&["END"], false, &["no stop here E"]), ("no stop here E".into(), None));
    }

    /// Byte `b`'s id in the byte-level test vocabulary (two control tokens come first).
    fn byte(b: u8) -> u32 {
        b as u32 + 2
    }

    #[test]
    fn a_token_ends_its_sample_by_eos_stop_token_stop_string_then_length() {
        let tokenizer = crate::tokenizer::tests::byte_level_tokenizer();
        let stream = || TextStream::new(&tokenizer, &[], true, vec!["xy".into()], false);
        let take = |s: &mut TextStream, b: u8, ends: TokenEnds| s.take_token(&tokenizer, byte(b), ends);
        let go_on = TokenEnds::default();

        // "ax": "x" may begin "xy", so it is held back; end-of-sequence releases it, adds no text.
        let mut s = stream();
        assert_eq!(take(&mut s, b'a', go_on).delta.unwrap().text, "a");
        assert_eq!(take(&mut s, b'x', go_on).delta.unwrap().text, "");
        let end = take(&mut s, b'z', TokenEnds { eos: true, ..go_on });
        assert_eq!((end.delta.unwrap().text.as_str(), end.finish), ("x", Some((FinishReason::Stop, None))));

        // A stop token is text of the answer, and ends the sample with its id.
        let mut s = stream();
        let end = take(&mut s, b'q', TokenEnds { stop_token: true, length: true, ..go_on });
        assert_eq!(end.delta.unwrap().text, "q");
        assert_eq!(end.finish, Some((FinishReason::Stop, Some(StopReason::Token(byte(b'q'))))));

        // A stop string completed by the last allowed token wins over the length, and is cut.
        let mut s = stream();
        take(&mut s, b'x', go_on);
        let end = take(&mut s, b'y', TokenEnds { length: true, ..go_on });
        assert_eq!(end.delta.unwrap().text, "");
        assert_eq!(end.finish, Some((FinishReason::Stop, Some(StopReason::String("xy".into())))));

        // At its length the sample releases what it held.
        let mut s = stream();
        take(&mut s, b'a', go_on);
        let end = take(&mut s, b'x', TokenEnds { length: true, ..go_on });
        assert_eq!((end.delta.unwrap().text.as_str(), end.finish), ("x", Some((FinishReason::Length, None))));
    }

    #[test]
    fn multibyte_text_and_earliest_stop() {
        assert_eq!(feed(&["。"], false, &["你好", "。再见"]), ("你好".into(), Some("。".into())));
        assert_eq!(feed(&["b", "ab"], false, &["xab"]), ("x".into(), Some("ab".into())));
    }
}
