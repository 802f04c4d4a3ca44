//! `serve --device cpu --tensor-parallel-size N` on the real model (SmolLM2-135M: 9 query heads,
//! 3 key/value heads, so 3 ranks split it evenly): the ranks behind one scheduler give the
//! reference greedy completions, and a split the model refuses (2 ranks for 9 heads) is a startup
//! error that names the flag. Short on purpose: CI runs the suite on 2 cores.

use std::process::Command;

use pagedserve_tests::{binary, model_path, reference, Server};
use serde_json::json;

#[test]
fn three_ranks_give_the_reference_greedy_completions() {
    let server = Server::start(&["--device", "cpu", "--tensor-parallel-size", "3", "--max-model-len", "256"]);
    // The log is coloured: the field reads `tensor_parallel_size=3` once the escapes are gone.
    let log = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap().replace_all(&server.log(), "").into_owned();
    assert!(log.contains("tensor_parallel_size=3"), "the startup log reports the split:\n{log}");
    let reference = reference();
    let plain = reference["greedy"]["prompts"].as_array().unwrap().iter().filter(|p| p["kind"] == "plain");
    for prompt in plain {
        let body = json!({"prompt": prompt["prompt_text"], "max_tokens": 32, "temperature": 0, "ignore_eos": true});
        let answer = server.post_ok("/v1/completions", &body);
        let expected = prompt["new_text_skip_special"].as_str().unwrap();
        assert_eq!(answer["choices"][0]["text"], expected, "{}", prompt["prompt_text"]);
    }
}

#[test]
fn two_ranks_are_refused_at_startup_for_nine_heads() {
    let output = Command::new(binary())
        .args(["serve", "--device", "cpu", "--port", "0", "--tensor-parallel-size", "2", "--model"])
        .arg(model_path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running pagedserve serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "serve must refuse the split:\n{stderr}");
    assert!(stderr.contains("--tensor-parallel-size 2"), "the error names the flag:\n{stderr}");
    assert!(stderr.contains("the 9 query heads do not divide evenly"), "the error says why:\n{stderr}");
    assert!(!stderr.contains("listening on"), "nothing was served:\n{stderr}");
}
