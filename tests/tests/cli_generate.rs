//! `pagedserve generate` on the real default model: the greedy continuations of the reference
//! prompts, text and ids, through the real binary.

use std::process::Command;

use pagedserve_tests::{binary, ids, model_path, reference};

fn generate(args: &[&str]) -> (String, String) {
    let output = Command::new(binary())
        .arg("generate")
        .arg("--model")
        .arg(model_path())
        .args(args)
        .output()
        .expect("running pagedserve");
    let stdout = String::from_utf8(output.stdout).expect("utf-8 output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "pagedserve generate failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn plain_and_chat_prompts_give_the_reference_continuations() {
    let reference = reference();
    for prompt in reference["greedy"]["prompts"].as_array().unwrap() {
        let expected = ids(&prompt["new_ids"]);
        let max_tokens = expected.len().to_string();
        let mut args = vec!["--max-tokens", &max_tokens, "--ignore-eos", "--print-ids"];
        let text = if prompt["kind"] == "chat" {
            args.push("--chat");
            prompt["messages"][0]["content"].as_str().unwrap()
        } else {
            prompt["prompt_text"].as_str().unwrap()
        };
        args.extend(["--prompt", text]);
        let (stdout, _) = generate(&args);
        let ids_line = stdout.lines().last().unwrap();
        assert_eq!(ids_line, format!("{expected:?}"), "{text:?}");
        // The streamed text is the reference text with special tokens skipped.
        let streamed = &stdout[..stdout.len() - ids_line.len() - 1];
        assert_eq!(streamed.trim_end_matches('\n'), prompt["new_text_skip_special"].as_str().unwrap().trim_end_matches('\n'));
    }
}

#[test]
fn an_fp8_kv_cache_keeps_the_plain_prompts_continuations_and_unknown_types_are_refused() {
    // E4M3 rounding of every key and value leaves the two plain prompts' 32 greedy tokens as
    // they were (`host/tests/fp8_reference.rs` measures how far each prompt's log-probs move).
    for prompt in reference()["greedy"]["prompts"].as_array().unwrap().iter().filter(|p| p["kind"] != "chat") {
        let expected = ids(&prompt["new_ids"]);
        let max_tokens = expected.len().to_string();
        let text = prompt["prompt_text"].as_str().unwrap();
        let (stdout, _) = generate(&["--kv-cache-dtype", "fp8", "--max-tokens", &max_tokens, "--ignore-eos", "--print-ids", "--prompt", text]);
        assert_eq!(stdout.lines().last().unwrap(), format!("{expected:?}"), "{text:?}");
    }
    for (value, says) in [("fp8_e5m2", "E4M3"), ("int8", "expected auto, fp8 or fp8_e4m3")] {
        let output = Command::new(binary())
            .args(["serve", "--device", "cpu", "--port", "0", "--model"])
            .arg(model_path())
            .args(["--kv-cache-dtype", value])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--kv-cache-dtype") && stderr.contains(says), "{value}: {stderr}");
    }
}

#[test]
fn generation_stops_at_end_of_sequence() {
    let (stdout, stderr) = generate(&["--chat", "--prompt", "What is the capital of France?", "--max-tokens", "32"]);
    assert_eq!(stdout.trim_end(), "The capital of France is Paris.");
    assert!(stderr.contains("8 generated"), "stops after <|im_end|>: {stderr}");
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let output = Command::new(binary())
        .args(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
}

#[test]
fn fp8_quantization_on_the_cpu_is_refused_by_name() {
    // FP8 products exist on the GPU only: the CPU commands and `serve --device cpu` say so
    // instead of running bf16 weights under an FP8 flag.
    let generate = Command::new(binary())
        .args(["generate", "--model"])
        .arg(model_path())
        .args(["--quantization", "fp8", "--prompt", "hi"])
        .output()
        .unwrap();
    let serve = Command::new(binary())
        .args(["serve", "--device", "cpu", "--port", "0", "--model"])
        .arg(model_path())
        .args(["--quantization", "fp8"])
        .output()
        .unwrap();
    for output in [generate, serve] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--quantization fp8 is not available")
                && stderr.contains("--device cuda"),
            "{stderr}"
        );
    }
}

#[test]
fn keeping_gguf_blocks_quantized_on_the_cpu_is_refused_by_name() {
    let output = Command::new(binary())
        .args(["generate", "--model"])
        .arg(model_path())
        .args(["--keep-quantized", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--keep-quantized is not available"), "{stderr}");
}

#[test]
fn serve_refuses_cache_sizes_and_limits_it_cannot_honour_with_a_clear_error() {
    // Each would once have crashed (an infinite or huge cache: a capacity overflow or an aborted
    // allocation) or started a server that refuses everything (a queue of 0).
    let cases: [(&[&str], &str); 5] = [
        (&["--kv-cache-memory-gb", "inf"], "--kv-cache-memory-gb must be a positive number"),
        (&["--kv-cache-memory-gb", "1e9"], "more than this machine's available memory"),
        (&["--num-kv-blocks", "100000000000"], "more than this machine's available memory"),
        (&["--max-queue", "0"], "--max-queue must be at least 1"),
        (&["--gpu-memory-utilization", "5"], "--gpu-memory-utilization must be above 0 and at most 1"),
    ];
    for (args, expected) in cases {
        let output = Command::new(binary())
            .args(["serve", "--port", "0", "--device", "cpu"])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
