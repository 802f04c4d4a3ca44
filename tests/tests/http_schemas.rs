//! Twenty-odd JSON schemas through `response_format` on the default model over HTTP, greedy, not
//! streamed and streamed: every output parses and validates against its schema (checked by the
//! `jsonschema` crate, independently of llguidance) and ends with `finish_reason: "stop"`. The
//! schemas cover nested objects, arrays with bounds, enums, anyOf/oneOf, numbers with ranges,
//! string patterns and lengths, required and optional properties. Bounds keep every output
//! finite, as a client's schema should (see the README). A schema feature llguidance does not
//! implement (`uniqueItems`) is a 400 naming `response_format`.

use pagedserve_tests::{stream_text, Server};
use serde_json::{json, Value};

fn schemas() -> Vec<(&'static str, Value)> {
    let name = json!({"type": "string", "maxLength": 24});
    let small = json!({"type": "integer", "minimum": 0, "maximum": 1000});
    vec![
        ("a person", json!({"type": "object", "properties": {"name": name, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false})),
        ("a boolean", json!({"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"], "additionalProperties": false})),
        ("an enum", json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"], "additionalProperties": false})),
        ("a const", json!({"type": "object", "properties": {"kind": {"const": "fruit"}, "name": name}, "required": ["kind", "name"], "additionalProperties": false})),
        ("a bounded number", json!({"type": "object", "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}}, "required": ["celsius"], "additionalProperties": false})),
        ("an exclusive range", json!({"type": "object", "properties": {"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}, "required": ["p"], "additionalProperties": false})),
        ("a string pattern", json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}, "required": ["code"], "additionalProperties": false})),
        ("string lengths", json!({"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}}, "required": ["word"], "additionalProperties": false})),
        ("a bounded array", json!({"type": "object", "properties": {"tags": {"type": "array", "items": name, "minItems": 1, "maxItems": 3}}, "required": ["tags"], "additionalProperties": false})),
        ("an array of integers", json!({"type": "array", "items": small, "minItems": 2, "maxItems": 4})),
        ("a tuple", json!({"type": "array", "prefixItems": [name, small], "items": false, "minItems": 2})),
        ("nested objects", json!({"type": "object", "properties": {"city": {"type": "object", "properties": {"name": name, "country": name}, "required": ["name", "country"], "additionalProperties": false}}, "required": ["city"], "additionalProperties": false})),
        ("an array of objects", json!({"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"id": small, "label": name}, "required": ["id", "label"], "additionalProperties": false}}}, "required": ["items"], "additionalProperties": false})),
        ("optional properties", json!({"type": "object", "properties": {"title": name, "subtitle": name}, "required": ["title"], "additionalProperties": false})),
        ("anyOf", json!({"type": "object", "properties": {"value": {"anyOf": [small, name]}}, "required": ["value"], "additionalProperties": false})),
        ("oneOf", json!({"type": "object", "properties": {"shape": {"oneOf": [
            {"type": "object", "properties": {"circle": small}, "required": ["circle"], "additionalProperties": false},
            {"type": "object", "properties": {"square": small}, "required": ["square"], "additionalProperties": false}]}}, "required": ["shape"], "additionalProperties": false})),
        ("a nullable field", json!({"type": "object", "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 16}}, "required": ["middle_name"], "additionalProperties": false})),
        ("definitions and a reference", json!({"$defs": {"point": {"type": "object", "properties": {"x": small, "y": small}, "required": ["x", "y"], "additionalProperties": false}},
            "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}, "required": ["from", "to"], "additionalProperties": false})),
        ("a date-like pattern", json!({"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}, "required": ["date"], "additionalProperties": false})),
        ("a string enum array", json!({"type": "array", "items": {"enum": ["low", "medium", "high"]}, "minItems": 1, "maxItems": 3})),
        ("a top-level enum", json!({"enum": ["yes", "no", "maybe"]})),
        ("a top-level bounded integer", small.clone()),
        ("deep nesting", json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}}, "required": ["c"], "additionalProperties": false}}, "required": ["b"], "additionalProperties": false}}, "required": ["a"], "additionalProperties": false})),
    ]
}

#[test]
fn every_output_parses_and_validates_against_its_schema() {
    let server = Server::start(&["--device", "cpu"]);
    let all = schemas();
    assert!(all.len() >= 20);
    let server = &server;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = all
            .into_iter()
            .map(|(label, schema)| {
                scope.spawn(move || {
                    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{label}: the test's schema: {e}"));
                    let request = json!({"messages": [{"role": "user", "content": format!("Answer with JSON: {label}.")}],
                                         "max_tokens": 200, "temperature": 0,
                                         "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}});
                    let answer = server.post_ok("/v1/chat/completions", &request);
                    let text = answer["choices"][0]["message"]["content"].as_str().unwrap().to_string();
                    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{label}: {text:?}");
                    let (streamed, finish) = stream_text(&server.stream("/v1/chat/completions", &request), 0);
                    assert_eq!(finish.as_deref(), Some("stop"), "{label} streamed: {streamed:?}");
                    for (how, text) in [("not streamed", &text), ("streamed", &streamed)] {
                        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{label} ({how}): {text:?}: {e}"));
                        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
                        assert!(errors.is_empty(), "{label} ({how}): {text} does not validate: {errors:?}");
                    }
                })
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|t| t.join().err())
            .map(|panic| panic.downcast_ref::<String>().cloned().unwrap_or_default())
            .collect()
    });
    // A schema feature llguidance does not implement is a 400 that says which, not a loose output.
    let unique = json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true});
    let reply = server.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": unique}}}));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "response_format");
    assert!(reply.body.contains("uniqueItems"), "{}", reply.body);
    assert!(failures.is_empty(), "{} schema(s) failed:\n{}\n{}", failures.len(), failures.join("\n"), server.log());
}
