//! Incremental detokenization for streaming.
//!
//! Decoding token by token is wrong for byte-level and byte-fallback vocabularies: one
//! character can span several tokens (each decodes to U+FFFD on its own), and SentencePiece
//! decoders treat the first token of a string specially. [`IncrementalDetokenizer`] uses the
//! prefix/read offset technique of vLLM and TGI: it decodes only a short window of recent
//! tokens, `ids[prefix_offset..]`, and emits the part beyond `decode(ids[prefix_offset..
//! read_offset])` once that text no longer ends in U+FFFD (an incomplete UTF-8 sequence). The
//! window is reset at every emission, so the work per token is O(1) amortized for ordinary
//! text (a run of invalid bytes is emitted as U+FFFD after `MAX_PENDING` tokens, as `decode`
//! renders it, all but the incomplete character at its end, to keep that bound). Special tokens are dropped before they enter the window when `skip_special_tokens`.
//!
//! Invariant: the concatenation of everything [`step`](IncrementalDetokenizer::step) returned
//! plus [`finish`](IncrementalDetokenizer::finish) equals `decode(all_ids, skip_special_tokens)`
//! (for a detokenizer created with [`new`](IncrementalDetokenizer::new)).

use super::{Tokenizer, TokenizerError};

/// How many prompt tokens [`IncrementalDetokenizer::with_context`] keeps as decoding context.
pub const CONTEXT_TOKENS: usize = 5;

/// A window whose text has ended in U+FFFD for this many tokens is emitted anyway: a UTF-8
/// character has at most 4 bytes, so only a stream of invalid bytes gets here, and emitting
/// keeps the per-token cost bounded.
const MAX_PENDING: usize = 16;

/// Drop consumed ids once this many precede the window.
const COMPACT_AFTER: usize = 64;

/// Streaming detokenizer state for one sequence. It holds no reference to the tokenizer; pass
/// the same [`Tokenizer`] to every call.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Token ids; only `ids[prefix_offset..]` still matter.
    ids: Vec<u32>,
    /// Start of the decoding window: tokens before it are fully emitted and not needed as context.
    prefix_offset: usize,
    /// Tokens before this index have been emitted.
    read_offset: usize,
    /// `decode(ids[prefix_offset..read_offset])`, cached until the offsets move.
    prefix_text: Option<String>,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a fresh stream of generated tokens.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix_text: None,
            skip_special_tokens,
        }
    }

    /// A detokenizer whose window starts with the last [`CONTEXT_TOKENS`] prompt tokens as
    /// context that is never emitted (as vLLM does). With SentencePiece vocabularies this keeps
    /// the leading space of the first generated word (`"▁Paris"` streams as `" Paris"`); the
    /// emitted text is then `decode(prompt + generated)` minus `decode(prompt)`.
    pub fn with_context(
        prompt_ids: &[u32],
        tokenizer: &Tokenizer,
        skip_special_tokens: bool,
    ) -> Self {
        let mut ctx: Vec<u32> = prompt_ids
            .iter()
            .copied()
            .filter(|&id| !(skip_special_tokens && tokenizer.is_special_token_id(id)))
            .collect();
        let start = ctx.len().saturating_sub(CONTEXT_TOKENS);
        ctx.drain(..start);
        let n = ctx.len();
        Self {
            ids: ctx,
            prefix_offset: 0,
            read_offset: n,
            prefix_text: None,
            skip_special_tokens,
        }
    }

    /// Whether special tokens are dropped from the output.
    pub fn skip_special_tokens(&self) -> bool {
        self.skip_special_tokens
    }

    /// Feed one token id; returns the newly completed text (possibly empty).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        tokenizer.check_ids(&[id])?;
        if self.skip_special_tokens && tokenizer.is_special_token_id(id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        let new_text =
            tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if new_text.ends_with('\u{FFFD}') {
            if self.ids.len() - self.read_offset < MAX_PENDING {
                return Ok(String::new()); // incomplete character: wait for more bytes
            }
            return self.emit_final_part(tokenizer, &new_text);
        }
        let prefix_len = self.prefix_text(tokenizer)?.len();
        if new_text.len() <= prefix_len {
            return Ok(String::new());
        }
        let delta = self.delta(&new_text);
        self.advance_to(self.ids.len());
        Ok(delta)
    }

    /// A window that has ended in U+FFFD for `MAX_PENDING` tokens (a run of invalid bytes):
    /// emits the text of its longest run of whole tokens that later bytes cannot change, and
    /// keeps the rest pending. Only the window's last character, an incomplete sequence, can still
    /// change (bytes yet to come may complete it); every U+FFFD before it is final. Found by the
    /// `detokenizer` fuzz target: emitting the whole window lost a character that the next tokens
    /// completed.
    fn emit_final_part(&mut self, tokenizer: &Tokenizer, new_text: &str) -> Result<String, TokenizerError> {
        let settled = &new_text[..new_text.len() - '\u{FFFD}'.len_utf8()];
        let prefix_len = self.prefix_text(tokenizer)?.len();
        for end in (self.read_offset + 1..self.ids.len()).rev() {
            let text = tokenizer.decode(&self.ids[self.prefix_offset..end], self.skip_special_tokens)?;
            if text.len() > prefix_len && settled.starts_with(text.as_str()) {
                let delta = self.delta(&text);
                self.advance_to(end);
                return Ok(delta);
            }
        }
        // No whole-token cut (not seen with byte-level or byte-fallback vocabularies): emit all,
        // as `decode` renders it, to keep the window bounded.
        let delta = if new_text.len() > prefix_len { self.delta(new_text) } else { String::new() };
        self.advance_to(self.ids.len());
        Ok(delta)
    }

    /// Flush whatever is held back (an incomplete character at the very end of the stream comes
    /// out as U+FFFD, as `decode` renders it). Further calls return an empty string.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let new_text =
            tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let prefix_len = self.prefix_text(tokenizer)?.len();
        let delta = if new_text.len() > prefix_len {
            self.delta(&new_text)
        } else {
            String::new()
        };
        self.advance_to(self.ids.len());
        Ok(delta)
    }

    fn prefix_text(&mut self, tokenizer: &Tokenizer) -> Result<&str, TokenizerError> {
        if self.prefix_text.is_none() {
            let text = tokenizer.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special_tokens,
            )?;
            self.prefix_text = Some(text);
        }
        Ok(self.prefix_text.as_deref().unwrap_or_default())
    }

    /// The part of `new_text` beyond the cached prefix text.
    fn delta(&self, new_text: &str) -> String {
        let prefix = self.prefix_text.as_deref().unwrap_or_default();
        if let Some(rest) = new_text.strip_prefix(prefix) {
            return rest.to_string();
        }
        // The window's decoding changed earlier text (a decoder that is not prefix-stable);
        // fall back to cutting at the prefix length, on a character boundary.
        tracing::debug!(
            prefix,
            new_text,
            "incremental decode: window text does not extend the prefix"
        );
        let mut cut = prefix.len().min(new_text.len());
        while !new_text.is_char_boundary(cut) {
            cut += 1;
        }
        new_text[cut..].to_string()
    }

    /// Move the window past the text just emitted, that of the tokens before `emitted_to`.
    fn advance_to(&mut self, emitted_to: usize) {
        self.prefix_offset = self.read_offset;
        self.read_offset = emitted_to;
        self.prefix_text = None;
        if self.prefix_offset >= COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{byte_level_tokenizer, spm_tokenizer};
    use super::*;

    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut d = IncrementalDetokenizer::new(skip);
        let mut pieces: Vec<String> = ids.iter().map(|&id| d.step(tok, id).unwrap()).collect();
        pieces.push(d.finish(tok).unwrap());
        let joined = pieces.concat();
        (pieces, joined)
    }

    #[test]
    fn multibyte_characters_are_held_until_complete() {
        let tok = byte_level_tokenizer();
        let text = "hi 你好, wörld 🎉!";
        let ids = tok.encode(text, false).unwrap();
        // Each emitted piece is valid text with no replacement character.
        let (pieces, joined) = stream(&tok, &ids, false);
        assert_eq!(joined, text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        // 🎉 is four single-byte tokens: three empty steps, then the whole character.
        let party = ids.len() - 5;
        assert_eq!(&pieces[party..party + 4], &["", "", "", "🎉"]);
    }

    #[test]
    fn special_tokens_kept_or_skipped() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("<|start|>hi<|end|> 你<|end|>", false).unwrap();
        assert_eq!(ids[0], 1);
        for skip in [false, true] {
            let (_, joined) = stream(&tok, &ids, skip);
            assert_eq!(joined, tok.decode(&ids, skip).unwrap(), "skip={skip}");
        }
        assert_eq!(stream(&tok, &ids, true).1, "hi 你");
    }

    #[test]
    fn special_token_inside_a_character() {
        // A special token between the bytes of one character: skipped, the bytes join up.
        let tok = byte_level_tokenizer();
        let ni: Vec<u32> = tok.encode("你", false).unwrap();
        assert_eq!(ni.len(), 2);
        let ids = vec![ni[0], 0, ni[1]];
        for skip in [false, true] {
            let (_, joined) = stream(&tok, &ids, skip);
            assert_eq!(joined, tok.decode(&ids, skip).unwrap(), "skip={skip}");
        }
    }

    #[test]
    fn truncated_character_is_flushed_by_finish() {
        let tok = byte_level_tokenizer();
        let ni = tok.encode("你", false).unwrap();
        let ids = vec![tok.encode("hi", false).unwrap()[0], ni[0]];
        let (pieces, joined) = stream(&tok, &ids, false);
        assert_eq!(
            pieces,
            vec!["hi".to_string(), String::new(), "\u{FFFD}".to_string()]
        );
        assert_eq!(joined, tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn long_stream_compacts_and_stays_exact() {
        let tok = byte_level_tokenizer();
        let text = "hi wörld 你好 ".repeat(50);
        let ids = tok.encode(&text, false).unwrap();
        let mut d = IncrementalDetokenizer::new(false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.step(&tok, id).unwrap());
            assert!(
                d.ids.len() < COMPACT_AFTER + 16,
                "window grew to {}",
                d.ids.len()
            );
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, text);
        assert_eq!(d.finish(&tok).unwrap(), "");
    }

    #[test]
    fn invalid_byte_run_does_not_grow_the_window_forever() {
        let tok = byte_level_tokenizer();
        let cont = tok.token_to_id(&super::super::tests::bl(&[0x80])).unwrap();
        let mut ids = vec![cont; 40];
        ids.extend(tok.encode("hi 你", false).unwrap());
        let mut d = IncrementalDetokenizer::new(false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.step(&tok, id).unwrap());
            assert!(d.ids.len() - d.prefix_offset <= 2 * MAX_PENDING);
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn a_character_completed_after_a_long_invalid_run_is_not_lost() {
        // Found by the `detokenizer` fuzz target: lone lead bytes past `MAX_PENDING`, the last
        // of which the next two tokens complete into "क" (E0 A4 95).
        let tok = byte_level_tokenizer();
        let byte = |b: u8| tok.token_to_id(&super::super::tests::bl(&[b])).unwrap();
        for run in [MAX_PENDING - 1, MAX_PENDING, MAX_PENDING + 1, 3 * MAX_PENDING] {
            let mut ids = vec![byte(0xE0); run];
            ids.extend([byte(0xA4), byte(0x95)]);
            ids.extend(tok.encode(" ok", false).unwrap());
            let (_, joined) = stream(&tok, &ids, false);
            assert_eq!(joined, tok.decode(&ids, false).unwrap(), "a run of {run}");
            assert!(joined.ends_with("\u{FFFD}क ok"), "{joined:?}");
        }
    }

    #[test]
    fn invalid_id_is_an_error() {
        let tok = byte_level_tokenizer();
        let mut d = IncrementalDetokenizer::new(false);
        assert!(matches!(
            d.step(&tok, 1_000_000),
            Err(TokenizerError::InvalidTokenId { .. })
        ));
    }

    #[test]
    fn sentencepiece_byte_fallback_and_leading_space() {
        let tok = spm_tokenizer();
        let text = "hello é world 你 hello";
        let ids = tok.encode(text, true).unwrap();
        for skip in [false, true] {
            let (pieces, joined) = stream(&tok, &ids, skip);
            assert_eq!(joined, tok.decode(&ids, skip).unwrap(), "skip={skip}");
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        }
        assert_eq!(stream(&tok, &ids, true).1, text);
    }

    #[test]
    fn context_keeps_leading_space_of_first_generated_word() {
        let tok = spm_tokenizer();
        let prompt = tok.encode("hello", true).unwrap();
        let generated = tok.encode("world hello", false).unwrap();
        let mut d = IncrementalDetokenizer::with_context(&prompt, &tok, true);
        let mut out = String::new();
        for &id in &generated {
            out.push_str(&d.step(&tok, id).unwrap());
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, " world hello");
    }
}
