//! Rendering engine output into API shapes: response ids, stop reasons, and log-probs (token text
//! and UTF-8 bytes of each token, in the completions and the chat shape).

use std::collections::BTreeMap;

use crate::api::{ChatLogprob, ChatTopLogprob, CompletionLogprobs};
use crate::engine::StopReason;
use crate::sampling::Sampled;
use crate::tokenizer::Tokenizer;

/// `cmpl-<32 hex digits>` and the like.
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn stop_reason_json(reason: Option<&StopReason>) -> Option<serde_json::Value> {
    match reason? {
        StopReason::Token(id) => Some((*id).into()),
        StopReason::String(s) => Some(s.clone().into()),
    }
}

/// The text of one token on its own (special tokens included; a piece of a multi-byte character
/// shows as U+FFFD, as in vLLM).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// The bytes one token stands for. Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3,
/// Qwen2) spell each byte as one printable character; a token that decodes to incomplete UTF-8
/// is mapped back through that alphabet so its exact bytes are reported.
pub fn token_bytes(tokenizer: &Tokenizer, id: u32, text: &str) -> Vec<u8> {
    if !text.contains('\u{FFFD}') {
        return text.as_bytes().to_vec();
    }
    tokenizer
        .id_to_token(id)
        .and_then(|piece| piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// Inverse of GPT-2's `bytes_to_unicode`.
fn byte_level_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The other 68 bytes map, in order, to U+0100 and up.
    let index = c.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(index as usize).map(|b| b as u8)
}

/// A token as the completions log-probs spell it: its text, or where that is a piece of a
/// multi-byte character, `bytes:` and its bytes as `\xNN` (OpenAI's spelling). Such pieces all
/// decode to U+FFFD, so as keys of `top_logprobs` they would collide and hide each other.
pub fn completion_token(tokenizer: &Tokenizer, id: u32) -> String {
    let text = token_text(tokenizer, id);
    if !text.contains('\u{FFFD}') {
        return text;
    }
    let bytes = token_bytes(tokenizer, id, &text);
    if std::str::from_utf8(&bytes).is_ok() {
        return text; // a U+FFFD of the vocabulary's own, or bytes the alphabet could not give back
    }
    let mut spelled = String::from("bytes:");
    for b in bytes {
        spelled.push_str(&format!("\\x{b:02x}"));
    }
    spelled
}

/// Appends one choice's new tokens to its completions-shaped log-probs. `offset` is the character
/// offset of the first token's text in the choice's text; `texts` the text each token added.
pub fn push_completion_logprobs(
    tokenizer: &Tokenizer,
    out: &mut CompletionLogprobs,
    sampled: &[Sampled],
    mut offset: usize,
    texts: &[&str],
) {
    for (i, s) in sampled.iter().enumerate() {
        out.tokens.push(completion_token(tokenizer, s.token));
        out.token_logprobs.push(Some(s.logprob));
        let mut top: BTreeMap<String, f32> = BTreeMap::new();
        for alt in &s.top {
            top.entry(completion_token(tokenizer, alt.token)).or_insert(alt.logprob);
        }
        top.insert(completion_token(tokenizer, s.token), s.logprob);
        out.top_logprobs.push(Some(top));
        out.text_offset.push(offset);
        offset += texts.get(i).map_or(0, |t| t.chars().count());
    }
}

pub fn chat_logprobs(tokenizer: &Tokenizer, sampled: &[Sampled]) -> Vec<ChatLogprob> {
    sampled
        .iter()
        .map(|s| {
            let token = token_text(tokenizer, s.token);
            let bytes = token_bytes(tokenizer, s.token, &token);
            ChatLogprob {
                bytes: Some(bytes),
                token,
                logprob: s.logprob,
                top_logprobs: s
                    .top
                    .iter()
                    .map(|alt| {
                        let token = token_text(tokenizer, alt.token);
                        ChatTopLogprob { bytes: Some(token_bytes(tokenizer, alt.token, &token)), token, logprob: alt.logprob }
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_round_trips() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('\u{00E4}'), Some(0xE4));
        assert_eq!(byte_level_byte('\u{4E00}'), None);
    }
}
