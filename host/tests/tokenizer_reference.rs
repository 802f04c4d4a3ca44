//! The tokenizer layer against Hugging Face reference outputs for SmolLM2-135M-Instruct
//! (`shared/reference/smollm2_subset.json`): tokenization ids and round trips, the chat
//! template, and streaming detokenization of the greedy continuations.
//!
//! The tokenizer is built from the default model's GGUF metadata; a missing model or reference
//! file fails the tests (see `common`).

mod common;

use pagedserve::model::gguf::GgufFile;
use pagedserve::tokenizer::{ChatMessage, GgufTokenizerSpec, IncrementalDetokenizer, Tokenizer};
use serde_json::Value;

fn setup() -> Option<(Value, Tokenizer)> {
    let reference = common::reference().clone();
    let file = GgufFile::open(&common::model_path()).expect("opening the default model");
    let spec = GgufTokenizerSpec::from_gguf(&file).expect("tokenizer metadata");
    assert_eq!(spec.model, "gpt2");
    assert_eq!(spec.pre.as_deref(), Some("smollm"));
    let tok = Tokenizer::from_gguf_spec(&spec).expect("tokenizer builds from the GGUF spec");
    Some((reference, tok))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn stream(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> String {
    let mut d = IncrementalDetokenizer::new(skip_special_tokens);
    let mut out = String::new();
    for &id in ids {
        let piece = d.step(tok, id).expect("detokenizer step");
        assert!(
            !piece.contains('\u{FFFD}'),
            "emitted a broken character in {piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&d.finish(tok).expect("detokenizer finish"));
    out
}

#[test]
fn smollm2_special_ids() {
    let Some((_, tok)) = setup() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.unk_token_id(), Some(0));
    assert!(!tok.add_bos_token());
    assert_eq!(tok.eos_token_ids()[0], 2);
    assert!(tok.is_stop_token(2));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    // SmolLM2 adds no BOS, even with add_special_tokens.
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
}

#[test]
fn smollm2_tokenize_cases() {
    let Some((reference, tok)) = setup() else {
        return;
    };
    let cases = reference["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            decoded,
            "decode of {text:?}"
        );
        assert_eq!(
            stream(&tok, &want, false),
            decoded,
            "streamed decode of {text:?}"
        );
        assert_eq!(
            stream(&tok, &want, true),
            tok.decode(&want, true).unwrap(),
            "streamed decode (skip special) of {text:?}"
        );
    }
}

#[test]
fn smollm2_chat_template_examples() {
    let Some((reference, tok)) = setup() else {
        return;
    };
    let template = reference["chat_template"]["template"].as_str().unwrap();
    assert_eq!(
        tok.chat_template(),
        Some(template),
        "the GGUF carries the reference template"
    );
    let examples = reference["chat_template"]["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    for ex in examples {
        let messages: Vec<ChatMessage> = serde_json::from_value(ex["messages"].clone()).unwrap();
        let add_gen = ex["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok.apply_chat_template(&messages, add_gen).unwrap();
        assert_eq!(rendered, ex["rendered"].as_str().unwrap());
        let want = ids_of(&ex["ids"]);
        assert_eq!(tok.encode(&rendered, false).unwrap(), want);
        assert_eq!(tok.encode_chat(&messages, add_gen).unwrap(), want);
    }
}

#[test]
fn smollm2_greedy_prompts_and_streaming() {
    let Some((reference, tok)) = setup() else {
        return;
    };
    let prompts = reference["greedy"]["prompts"].as_array().unwrap();
    assert!(!prompts.is_empty());
    for p in prompts {
        let prompt_text = p["prompt_text"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt_text, false).unwrap(),
            ids_of(&p["prompt_ids"]),
            "prompt {prompt_text:?}"
        );
        if p["kind"] == "chat" {
            let messages: Vec<ChatMessage> = serde_json::from_value(p["messages"].clone()).unwrap();
            assert_eq!(
                tok.apply_chat_template(&messages, true).unwrap(),
                prompt_text
            );
        }
        let new_ids = ids_of(&p["new_ids"]);
        let new_text = p["new_text"].as_str().unwrap();
        let new_text_skip = p["new_text_skip_special"].as_str().unwrap();
        assert_eq!(tok.decode(&new_ids, false).unwrap(), new_text);
        assert_eq!(tok.decode(&new_ids, true).unwrap(), new_text_skip);
        assert_eq!(
            stream(&tok, &new_ids, false),
            new_text,
            "stream of {prompt_text:?}"
        );
        assert_eq!(
            stream(&tok, &new_ids, true),
            new_text_skip,
            "stream (skip special) of {prompt_text:?}"
        );
        // Generation stops at the first stop id where HF stops at EOS.
        let stop_at = p["generate_stop_at_eos_new_ids"].as_array().unwrap().len();
        let first_stop = new_ids
            .iter()
            .position(|&id| tok.is_stop_token(id))
            .map(|i| i + 1);
        assert_eq!(
            first_stop.unwrap_or(new_ids.len()),
            stop_at,
            "stop position for {prompt_text:?}"
        );
    }
}
