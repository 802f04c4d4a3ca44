//! Tool calling over HTTP, with the real binary and the default model on the CPU. SmolLM2's chat
//! template has no tools, so the server describes them in the system prompt in the Hermes format
//! and parses `<tool_call>` blocks back out. Checked: `required` and named choices always call a
//! listed tool with arguments valid against its schema (the constraint engine guarantees it, even
//! for a 135M model), `finish_reason` is `tool_calls`, streamed deltas reassemble to the
//! non-streamed calls, `parallel_tool_calls: false` makes one call, `none` answers in text, a
//! history with calls and results renders, and bad tools or choices are 400s naming the field.
//! Then the official OpenAI Python client runs a whole round trip (`tests/clients/tool_roundtrip.py`).

use pagedserve_tests::{repo_root, Server};
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time in a time zone",
            "parameters": {"type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
                "required": ["utc_offset"], "additionalProperties": false}}}
    ])
}

fn ask(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Checks a call's shape and that its arguments fit its tool's schema; returns (name, arguments).
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    let id = call["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() > 10, "{call}");
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    let schema = tools().as_array().unwrap().iter().find(|t| t["function"]["name"] == name.as_str()).expect("a listed tool")
        ["function"]["parameters"]
        .clone();
    let validator = jsonschema::validator_for(&schema).unwrap();
    assert!(validator.is_valid(&arguments), "{name}({arguments}) does not fit {schema}");
    (name, arguments)
}

/// Streamed tool calls of choice 0 reassembled the way OpenAI clients do: by `index`, the first
/// piece carrying id and name, the rest appending arguments. Returns the calls, the content and
/// the finish reason.
fn reassemble(chunks: &[Value]) -> (Vec<Value>, String, Option<String>) {
    let mut calls: Vec<Value> = Vec::new();
    let mut content = String::new();
    let mut finish = None;
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let delta = &choice["delta"];
            content.push_str(delta["content"].as_str().unwrap_or(""));
            for piece in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = piece["index"].as_u64().unwrap() as usize;
                if index == calls.len() {
                    assert!(piece["id"].is_string() && piece["function"]["name"].is_string(), "a call's first piece: {piece}");
                    calls.push(json!({"id": piece["id"], "type": piece["type"],
                                      "function": {"name": piece["function"]["name"], "arguments": ""}}));
                } else {
                    assert!(index < calls.len() && piece.get("id").is_none(), "{piece}");
                }
                let more = piece["function"]["arguments"].as_str().unwrap_or("");
                let arguments = calls[index]["function"]["arguments"].as_str().unwrap().to_string() + more;
                calls[index]["function"]["arguments"] = arguments.into();
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (calls, content, finish)
}

#[test]
fn tool_calls_are_constrained_parsed_and_streamed() {
    let server = Server::start(&["--device", "cpu"]);

    // `required`, greedy: at least one valid call, `tool_calls` as the finish reason, no content.
    let request = json!({"messages": ask("What is the weather in Paris, in celsius?"), "tools": tools(),
                         "tool_choice": "required", "max_tokens": 120, "temperature": 0});
    let answer = server.post_ok("/v1/chat/completions", &request);
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}\n{}", server.log());
    assert!(choice["message"]["content"].is_null(), "{answer}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    for call in calls {
        check_call(call);
    }
    // Streamed, the same calls (ids aside) come back in pieces.
    let (streamed, content, finish) = reassemble(&server.stream("/v1/chat/completions", &request));
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(content, "");
    let strip = |calls: &[Value]| calls.iter().map(|c| c["function"].clone()).collect::<Vec<_>>();
    assert_eq!(strip(&streamed), strip(calls), "streamed deltas reassemble to the whole answer");

    // A named function, sampled with n = 3 and no parallel calls: exactly one call of it each.
    let request = json!({"messages": ask("What time is it in Tokyo?"), "tools": tools(), "n": 3, "seed": 11,
                         "temperature": 1.0, "max_tokens": 100, "parallel_tool_calls": false,
                         "tool_choice": {"type": "function", "function": {"name": "get_time"}}});
    let answer = server.post_ok("/v1/chat/completions", &request);
    for choice in answer["choices"].as_array().unwrap() {
        let calls = choice["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(calls.len(), 1, "{choice}");
        let (name, arguments) = check_call(&calls[0]);
        assert_eq!(name, "get_time");
        assert!(arguments["utc_offset"].is_i64(), "{arguments}");
    }
    // Streamed with the same seed: the same calls.
    let mut one = request.clone();
    one["n"] = 1.into();
    let whole = server.post_ok("/v1/chat/completions", &one);
    let (streamed, _, finish) = reassemble(&server.stream("/v1/chat/completions", &one));
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(strip(&streamed), strip(whole["choices"][0]["message"]["tool_calls"].as_array().unwrap()));

    // `none`: the tools are context only; the answer is text.
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": ask("Say hello."), "tools": tools(),
        "tool_choice": "none", "max_tokens": 20, "temperature": 0}));
    assert!(answer["choices"][0]["message"]["content"].is_string(), "{answer}");
    assert!(answer["choices"][0]["message"].get("tool_calls").is_none(), "{answer}");
    assert_ne!(answer["choices"][0]["finish_reason"], "tool_calls");

    // `auto`: whatever the model writes, the answer is well formed: valid calls, or text.
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": ask("What is the weather in Rome, in celsius?"),
        "tools": tools(), "max_tokens": 80, "temperature": 0}));
    let message = &answer["choices"][0]["message"];
    match message["tool_calls"].as_array() {
        Some(calls) => {
            assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
            for call in calls {
                let (name, _) = (call["function"]["name"].as_str().unwrap(), ());
                assert!(serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).is_ok(), "{name}");
            }
        }
        None => assert!(message["content"].is_string(), "{answer}"),
    }

    // A conversation that already called a tool and has its result: the model answers in text.
    let history = json!([
        {"role": "user", "content": "What is the weather in Paris, in celsius?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc123", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"}
    ]);
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": history, "tools": tools(),
        "tool_choice": "none", "max_tokens": 30, "temperature": 0}));
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{answer}");
    // The rendered prompt holds the call and the result in the Hermes format.
    let tokens = server.post_ok("/tokenize", &json!({"messages": history}));
    let ids: Vec<u64> = tokens["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    let prompt = server.post_ok("/detokenize", &json!({"tokens": ids}));
    let prompt = prompt["prompt"].as_str().unwrap();
    assert!(prompt.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>"), "{prompt}");
    assert!(prompt.contains("<tool_response>\n{\"temperature\": 21, \"sky\": \"sunny\"}\n</tool_response>"), "{prompt}");

    // Bad tools and choices: 400s naming the field, and the server goes on.
    for (body, field) in [
        (json!({"messages": ask("hi"), "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "launch"}}}), "tool_choice"),
        (json!({"messages": ask("hi"), "tools": tools(), "tool_choice": "always"}), "tool_choice"),
        (json!({"messages": ask("hi"), "tool_choice": "required"}), "tool_choice"),
        (json!({"messages": ask("hi"), "tools": [{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}]}), "tools"),
        (json!({"messages": ask("hi"), "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}]}), "tools"),
        (json!({"messages": ask("hi"), "tools": [{"type": "function", "function": {"name": "f", "strict": true,
            "parameters": {"type": "object"}}}]}), "tools"),
        (json!({"messages": ask("hi"), "tools": tools(), "response_format": {"type": "json_object"}}), "response_format"),
        (json!({"messages": ask("hi"), "functions": [{"name": "f"}]}), "functions"),
        (json!({"messages": [{"role": "user", "content": null}]}), "messages"),
        (json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}), "messages"),
    ] {
        let reply = server.post("/v1/chat/completions", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], field, "{body}: {}", reply.body);
    }
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": ask("Hi"), "max_tokens": 4}));
    assert!(answer["choices"][0]["message"]["content"].is_string());
}

/// The round trip with the official OpenAI Python client (installed under `target/pyclient` by
/// `scripts/fetch-pyclient.sh`, which the test command runs): the model calls the tool, the
/// client sends the result back, the model answers; streamed deltas reassemble to the call.
#[test]
fn openai_python_client_round_trip() {
    let site = repo_root().join("target/pyclient");
    assert!(site.join("openai").exists(), "{} has no openai package: run scripts/fetch-pyclient.sh", site.display());
    let server = Server::start(&["--device", "cpu"]);
    let output = std::process::Command::new("python3")
        .arg(repo_root().join("tests/clients/tool_roundtrip.py"))
        .arg(server.url("/v1"))
        .env("PYTHONPATH", &site)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the client script failed:\n{stdout}\n{stderr}\n{}", server.log());
    assert!(stdout.contains("round trip ok"), "{stdout}");
}
