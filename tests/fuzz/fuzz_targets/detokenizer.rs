//! A stream of token ids from arbitrary bytes through the incremental detokenizer, as the engine
//! feeds it (with the prompt's last tokens as context or not, special tokens skipped or kept),
//! with the default model's tokenizer. The streamed pieces, joined, must be exactly what decoding
//! the whole output at once gives (`decode(prompt + output) - decode(prompt)` with context, when
//! the prompt does not end inside a character).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedserve::tokenizer::{IncrementalDetokenizer, CONTEXT_TOKENS};
use pagedserve_fuzz::default_tokenizer;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let tokenizer = default_tokenizer();
    let vocab = tokenizer.vocab_size() as u32;
    // Two bytes an id; a few high ids are left out of range on purpose (an error, not a panic).
    let ids: Vec<u32> = rest.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32 % (vocab + 4)).collect();
    let skip_special = flags & 1 != 0;
    // Up to CONTEXT_TOKENS prompt tokens of context (all of them are used).
    let context = usize::from(flags >> 1) % (CONTEXT_TOKENS + 1);
    let (prompt, output) = ids.split_at(context.min(ids.len()));
    if tokenizer.check_ids(prompt).is_err() {
        return;
    }
    let mut detok = if prompt.is_empty() {
        IncrementalDetokenizer::new(skip_special)
    } else {
        IncrementalDetokenizer::with_context(prompt, tokenizer, skip_special)
    };
    let mut streamed = String::new();
    let mut fed = Vec::new();
    for &id in output {
        match detok.step(tokenizer, id) {
            Ok(piece) => {
                streamed.push_str(&piece);
                fed.push(id);
            }
            Err(_) => assert!(id >= vocab, "id {id} is inside the vocabulary of {vocab} but was refused"),
        }
    }
    streamed.push_str(&detok.finish(tokenizer).expect("finish"));
    let kept = |ids: &[u32]| -> Vec<u32> { ids.iter().copied().filter(|&id| !(skip_special && tokenizer.is_special_token_id(id))).collect() };
    let context_ids = kept(prompt);
    let whole: Vec<u32> = context_ids.iter().copied().chain(kept(&fed)).collect();
    let expected_whole = tokenizer.decode(&whole, skip_special).expect("decode");
    let expected_prefix = tokenizer.decode(&context_ids, skip_special).expect("decode");
    match expected_whole.strip_prefix(expected_prefix.as_str()) {
        Some(expected) => assert_eq!(streamed, expected, "prompt {prompt:?} output {fed:?}"),
        // A prompt that ends inside a character (its text ends in U+FFFD, completed by the
        // output) has no exact answer; the stream must still be text, which it is by type.
        None => assert!(expected_prefix.ends_with('\u{FFFD}'), "prompt {prompt:?} output {fed:?}"),
    }
});
