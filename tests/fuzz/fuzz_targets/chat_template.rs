//! Chat messages from arbitrary bytes (a JSON array), rendered by every real chat template at hand
//! (the default model's and each architecture fixture's) and encoded as the server does, so that
//! special-token text in user content stays text: a conversation has as many special tokens after
//! encoding as the same one with every special spelling in its user content broken up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedserve::tokenizer::{ChatContent, ChatMessage};
use pagedserve_fuzz::templated_tokenizers;

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else { return };
    let Ok(messages) = serde_json::from_slice::<Vec<ChatMessage>>(json) else { return };
    let tokenizers = templated_tokenizers();
    let tokenizer = &tokenizers[which as usize % tokenizers.len()];
    let add_generation_prompt = which & 0x80 != 0;
    let Ok(ids) = tokenizer.encode_chat(&messages, add_generation_prompt) else { return };
    assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
    // The same conversation with every special-token spelling in user-written content broken by
    // an invisible separator: the template's own special tokens are then all the ids can hold, so
    // the counts must match.
    let specials = tokenizer.special_token_texts();
    if specials.iter().any(|s| s.chars().count() < 2) {
        return; // a one-character special token cannot be broken up: no comparison to make
    }
    let clean: Vec<ChatMessage> = messages
        .iter()
        .map(|m| match &m.content {
            ChatContent::Text(text) if m.role != "assistant" => {
                let mut text = text.clone();
                while let Some(s) = specials.iter().find(|s| text.contains(s.as_str())) {
                    let first = s.chars().next().expect("special texts are not empty");
                    let broken = format!("{first}\u{2063}{}", &s[first.len_utf8()..]);
                    text = text.replace(s.as_str(), &broken);
                }
                ChatMessage { content: ChatContent::Text(text), ..m.clone() }
            }
            _ => m.clone(),
        })
        .collect();
    let Ok(clean_ids) = tokenizer.encode_chat(&clean, add_generation_prompt) else { return };
    let count = |ids: &[u32]| ids.iter().filter(|&&id| tokenizer.is_special_token_id(id)).count();
    assert_eq!(count(&ids), count(&clean_ids), "user content became special tokens: {messages:?}");
});
