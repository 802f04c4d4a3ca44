//! One sample's text as it streams: incremental detokenizing, then stop strings. Text that could
//! still become a stop string is held back, so stop text never reaches the client, even when it
//! spans several tokens; what is held back is released when it can no longer match.

use crate::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};

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

    /// Adds a generated token; returns the text that is now safe to emit.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<TextDelta, TokenizerError> {
        let new_text = self.detokenizer.step(tokenizer, token)?;
        Ok(self.release(new_text))
    }

    /// The sample ended for another reason: everything still held is emitted (stop strings are
    /// still honoured in the flushed tail).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<TextDelta, TokenizerError> {
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

    #[test]
    fn multibyte_text_and_earliest_stop() {
        assert_eq!(feed(&["。"], false, &["你好", "。再见"]), ("你好".into(), Some("。".into())));
        assert_eq!(feed(&["b", "ab"], false, &["xab"]), ("x".into(), Some("ab".into())));
    }
}
