//! Structured outputs over HTTP, with the real binary and the default model on the CPU: what a
//! request's `response_format`, `structured_outputs` or `guided_*` field asks for is what comes
//! back, streamed or not, sampled or greedy, for every one of `n` choices; a schema that does not
//! compile is a 400 naming the field; so are tools on `/v1/completions` (they are for chat).

use pagedserve_tests::{stream_text, Server};
use serde_json::{json, Value};

fn content(answer: &Value, index: usize) -> String {
    answer["choices"][index]["message"]["content"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string()
}

#[test]
fn outputs_match_what_the_request_asked_for() {
    let server = Server::start(&["--device", "cpu"]);
    let ask = |text: &str| json!([{"role": "user", "content": text}]);

    // A JSON schema, greedy and sampled with n = 2: every choice parses and fits the schema.
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}, "required": ["city", "population"],
                        "additionalProperties": false});
    for (temperature, n) in [(0.0, 1), (0.9, 2)] {
        let request = json!({"messages": ask("Give the capital of France and its population as JSON."),
                             "max_tokens": 120, "temperature": temperature, "n": n, "seed": 3,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}});
        let answer = server.post_ok("/v1/chat/completions", &request);
        for i in 0..n {
            let text = content(&answer, i);
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("choice {i} {text:?}: {e}\n{}", server.log()));
            assert!(value["city"].is_string() && value["population"].is_i64(), "{text}");
            assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
            assert_eq!(answer["choices"][i]["finish_reason"], "stop", "the grammar ends the output: {answer}");
        }
    }

    // Any JSON object, streamed: the streamed text is an object too.
    let request = json!({"messages": ask("Describe a cat in JSON."), "max_tokens": 200, "temperature": 0, "stream": true,
                         "response_format": {"type": "json_object"}});
    let (streamed, finish) = stream_text(&server.stream("/v1/chat/completions", &request), 0);
    match finish.as_deref() {
        Some("stop") => assert!(serde_json::from_str::<serde_json::Map<String, Value>>(&streamed).is_ok(), "{streamed:?}"),
        // Cut off by max_tokens: a prefix of an object.
        _ => assert!(streamed.trim_start().starts_with('{'), "{streamed:?}"),
    }

    // vLLM's fields: a choice, a regex, and the older guided_* spelling.
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": ask("Is the sky blue?"), "max_tokens": 5,
        "temperature": 0, "structured_outputs": {"choice": ["yes", "no"]}}));
    let text = content(&answer, 0);
    assert!(text == "yes" || text == "no", "{text:?}");
    let answer = server.post_ok("/v1/completions", &json!({"prompt": "The year the war ended was", "max_tokens": 8,
        "temperature": 0.7, "seed": 1, "guided_regex": "[12][0-9]{3}"}));
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.len() == 4 && text.chars().all(|c| c.is_ascii_digit()), "{text:?}");

    // A schema that does not compile, and tools outside chat: 400s naming the field.
    let reply = server.post("/v1/chat/completions", &json!({"messages": ask("hi"), "guided_regex": "(("}));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "guided_regex", "{}", reply.body);
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let reply = server.post("/v1/completions", &json!({"prompt": "hi", "tools": tools}));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "tools", "{}", reply.body);
}

#[test]
fn literals_beyond_ascii_come_out_whole_and_a_finished_grammar_ends_the_output() {
    let server = Server::start(&["--device", "cpu"]);
    // A grammar forces a literal a token at a time, so its bytes may stop inside a character:
    // those pieces must be the literal's bytes, not U+FFFD.
    let choices = ["🍎", "日本語", "Zürich 🏔"];
    for (temperature, seed) in [(0.0, 0), (1.0, 5)] {
        let answer = server.post_ok("/v1/completions", &json!({"prompt": "A word:", "max_tokens": 20, "temperature": temperature,
                                                                "seed": seed, "guided_choice": choices}));
        let text = answer["choices"][0]["text"].as_str().unwrap();
        assert!(choices.contains(&text), "{text:?}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    }
    let schema = json!({"type": "object", "properties": {"city": {"enum": ["東京", "Zürich 🏔"]}}, "required": ["city"],
                        "additionalProperties": false});
    let answer = server.post_ok("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "A city?"}], "max_tokens": 40,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}));
    let value: Value = serde_json::from_str(&content(&answer, 0)).unwrap_or_else(|e| panic!("{answer}: {e}"));
    assert!(["東京", "Zürich 🏔"].contains(&value["city"].as_str().unwrap()), "{value}");
    // With ignore_eos the grammar's end still ends the output (not max_tokens of masked EOS).
    let answer = server.post_ok("/v1/completions", &json!({"prompt": "Fruit:", "max_tokens": 200, "temperature": 0,
                                                            "guided_choice": ["apple", "cherry"], "ignore_eos": true}));
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() < 10, "{answer}");
}
