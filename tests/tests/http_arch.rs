//! Every supported architecture served over HTTP by the real binary on the CPU, from the tiny
//! transformers checkpoints of `tests/fixtures/arch/` (see `scripts/make_arch_fixtures.py`): the
//! completion of a prompt given as token ids is transformers' greedy continuation (up to its
//! first near-tie), streamed and non-streamed alike, and a chat request renders the model's own
//! chat template and answers.

use pagedserve_tests::{ids, repo_root, stream_text, Server};
use serde_json::{json, Value};

const ARCHITECTURES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3_moe"];
/// transformers' top-1/top-2 log-prob margin below which the server may pick the other token.
const NEAR_TIE: f64 = 0.02;

fn serve_and_check(name: &str) {
    let dir = repo_root().join("tests/fixtures/arch").join(name);
    let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let server = Server::start_with_model(&dir, &["--device", "cpu", "--num-kv-blocks", "64", "--block-size", "4"]);

    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], name, "{name}: /v1/models");

    for prompt in reference["prompts"].as_array().unwrap() {
        let margins: Vec<f64> = prompt["steps"].as_array().unwrap().iter().map(|s| s["margin"].as_f64().unwrap()).collect();
        let sure = margins.iter().position(|&m| m < NEAR_TIE).unwrap_or(margins.len());
        if sure == 0 {
            continue;
        }
        let want_ids = &ids(&prompt["greedy"])[..sure];
        let want = server.post_ok("/detokenize", &json!({"tokens": want_ids}))["prompt"].as_str().unwrap().to_string();
        // Special tokens stay in the text, as `/detokenize` writes them.
        let request = json!({"prompt": prompt["prompt"], "max_tokens": sure, "temperature": 0, "ignore_eos": true,
                             "skip_special_tokens": false});
        let answer = server.post_ok("/v1/completions", &request);
        assert_eq!(answer["choices"][0]["text"], want.as_str(), "{name}: greedy completion\n{}", server.log());
        assert_eq!(answer["usage"]["completion_tokens"], sure as u64, "{name}");
        let (streamed, finish) = stream_text(&server.stream("/v1/completions", &request), 0);
        assert_eq!((streamed.as_str(), finish.as_deref()), (want.as_str(), Some("length")), "{name}: streamed");
    }

    let chat = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0});
    let answer = server.post_ok("/v1/chat/completions", &chat);
    let choice = &answer["choices"][0];
    assert!(choice["message"]["content"].is_string() && choice["finish_reason"].is_string(), "{name}: {answer}");
    // The prompt is the model's own template: its special tokens are in the token count.
    let tokens = server.post_ok("/tokenize", &json!({"messages": chat["messages"]}));
    assert_eq!(answer["usage"]["prompt_tokens"], tokens["count"], "{name}");
}

#[test]
fn every_architecture_serves_transformers_greedy_text_over_http() {
    let threads: Vec<_> = ARCHITECTURES.iter().map(|name| std::thread::spawn(move || serve_and_check(name))).collect();
    for (name, thread) in ARCHITECTURES.iter().zip(threads) {
        if let Err(panic) = thread.join() {
            panic!("{name}: {}", panic.downcast_ref::<String>().cloned().unwrap_or_default());
        }
    }
}
