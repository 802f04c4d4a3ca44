use serde_json::{json, Value};

use super::*;
use crate::constraint::testing::{decode, engine};

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}})
}

fn clock() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
        "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"]}}})
}

fn request(choice: Value, parallel: bool) -> ToolRequest {
    ToolRequest::parse(Some(&json!([weather(), clock()])), Some(&choice), Some(&json!(parallel))).unwrap().unwrap()
}

fn error(tools: Value, choice: Value) -> FieldError {
    ToolRequest::parse(Some(&tools), Some(&choice), None).unwrap_err()
}

#[test]
fn choices_parse_and_bad_ones_name_their_field() {
    assert_eq!(request(json!("auto"), true).choice, ToolChoice::Auto);
    assert_eq!(request(json!("required"), true).choice, ToolChoice::Required);
    assert_eq!(request(json!("none"), true).choice, ToolChoice::None);
    let named = request(json!({"type": "function", "function": {"name": "get_time"}}), true);
    assert_eq!(named.choice, ToolChoice::Function("get_time".into()));
    assert_eq!(ToolRequest::parse(None, Some(&json!("none")), None).unwrap(), None);

    let unknown = error(json!([weather()]), json!({"type": "function", "function": {"name": "nope"}}));
    assert_eq!(unknown.field, "tool_choice");
    assert!(unknown.message.contains("nope"), "{}", unknown.message);
    assert_eq!(error(json!([weather()]), json!("sometimes")).field, "tool_choice");
    assert_eq!(ToolRequest::parse(None, Some(&json!("required")), None).unwrap_err().field, "tool_choice");
    let not_schema = json!([{"type": "function", "function": {"name": "f", "parameters": "a string"}}]);
    assert_eq!(error(not_schema, json!("auto")).field, "tools");
    assert_eq!(error(json!([weather(), weather()]), json!("auto")).field, "tools");
    assert_eq!(error(json!([{"type": "retrieval"}]), json!("auto")).field, "tools");
    assert_eq!(error(json!([{"type": "function", "function": {"name": "has space"}}]), json!("auto")).field, "tools");
    let strict = json!([{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object"}}}]);
    assert_eq!(error(strict.clone(), json!("auto")).field, "tools");
    assert!(ToolRequest::parse(Some(&strict), Some(&json!("required")), None).is_ok());
    assert_eq!(ToolRequest::parse(Some(&json!([weather()])), None, Some(&json!("yes"))).unwrap_err().field, "parallel_tool_calls");
}

#[test]
fn formats_come_from_templates() {
    assert_eq!(ToolCallFormat::detect(Some("{{ '<tool_call>' }}")), ToolCallFormat::Hermes);
    assert_eq!(ToolCallFormat::detect(Some("{{ '[TOOL_CALLS]' }}")), ToolCallFormat::Mistral);
    assert_eq!(ToolCallFormat::detect(Some("{{- '<|python_tag|>' }}")), ToolCallFormat::Llama3Json);
    assert_eq!(ToolCallFormat::detect(Some("{{ messages }}")), ToolCallFormat::Hermes);
    assert_eq!(ToolCallFormat::detect(None), ToolCallFormat::Hermes);
}

/// The constrained output of a made-up model that wants to write `target`, parsed back.
fn constrained_calls(spec: &ConstraintSpec, format: ToolCallFormat, target: &str) -> Vec<ToolCall> {
    let (engine, tokenizer) = engine();
    let mut constraint = engine.compile(spec).unwrap_or_else(|e| panic!("{e}: {spec:?}"));
    let text = decode(&mut constraint, &tokenizer, target);
    let mut parser = ToolCallParser::new(format);
    parser.push(&text);
    parser.finish();
    parser.calls().unwrap_or_else(|| panic!("no valid calls in {text:?}")).to_vec()
}

#[test]
fn required_and_named_choices_always_produce_valid_calls() {
    let named = request(json!({"type": "function", "function": {"name": "get_weather"}}), true);
    for format in [ToolCallFormat::Hermes, ToolCallFormat::Llama3Json, ToolCallFormat::Mistral] {
        let spec = named.constraint(format, None).unwrap();
        // A model that wants to chat instead still calls the named tool with valid arguments.
        let calls = constrained_calls(&spec, format, "I would rather just talk about the weather.");
        assert_eq!(calls.len(), 1, "{format:?}");
        assert_eq!(calls[0].name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert!(args["city"].is_string() && ["c", "f"].contains(&args["unit"].as_str().unwrap()), "{args}");
        assert!(args.as_object().unwrap().len() == 2, "no extra properties: {args}");
    }
    // What the model wants goes through when it fits.
    let required = request(json!("required"), true);
    let spec = required.constraint(ToolCallFormat::Hermes, None).unwrap();
    let target = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": 3}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"c\"}}\n</tool_call>";
    let calls = constrained_calls(&spec, ToolCallFormat::Hermes, target);
    let got: Vec<(&str, &str)> = calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(got, [("get_time", "{\"zone\": 3}"), ("get_weather", "{\"city\": \"Oslo\", \"unit\": \"c\"}")]);
    // Without parallel calls, one call and then the end.
    let single = request(json!("required"), false).constraint(ToolCallFormat::Hermes, None).unwrap();
    assert_eq!(constrained_calls(&single, ToolCallFormat::Hermes, target).len(), 1);
    assert_eq!(request(json!("auto"), true).constraint(ToolCallFormat::Hermes, None), None);
}

#[test]
fn parameter_schemas_that_do_not_compile_are_found() {
    let (engine, _) = engine();
    let bad = ToolRequest::parse(
        Some(&json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}])),
        None,
        None,
    )
    .unwrap()
    .unwrap();
    assert!(bad.parameter_schemas().any(|spec| engine.compile(&spec).is_err()));
    assert!(request(json!("auto"), true).parameter_schemas().all(|spec| engine.compile(&spec).is_ok()));
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Qwen 2.5's handling of tools, cut down.
const QWEN_LIKE: &str = "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}\
{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n\
{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n\
{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn tokenizer_with(template: &str) -> crate::tokenizer::Tokenizer {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/llama");
    let mut tokenizer = crate::tokenizer::Tokenizer::from_hf_dir(&dir).unwrap();
    tokenizer.set_chat_template(template).unwrap();
    tokenizer
}

fn history() -> Vec<ChatMessage> {
    let mut call = ChatMessage::new("assistant", "");
    call.content = ChatContent::Null;
    call.extra.insert(
        "tool_calls".into(),
        json!([{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": 1}"}}]),
    );
    let mut result = ChatMessage::new("tool", "12:00");
    result.extra.insert("tool_call_id".into(), json!("call_1"));
    vec![ChatMessage::new("user", "What time is it in Paris?"), call, result]
}

#[test]
fn templates_without_tools_get_them_written_in_the_hermes_format() {
    let tokenizer = tokenizer_with(CHATML);
    let support = TemplateSupport::probe(&tokenizer);
    assert!(!support.tools && !support.tool_calls, "{support:?}");
    let tools = request(json!("auto"), true);
    let (messages, extra) = prepare_messages(&history(), Some(&tools), support, ToolCallFormat::Hermes).unwrap();
    assert!(extra.is_none());
    let text = tokenizer.apply_chat_template_with(&messages, true, None).unwrap();
    assert!(text.starts_with("<|im_start|>system\n# Tools"), "{text}");
    assert!(text.contains("\"name\":\"get_weather\""), "the tools are listed: {text}");
    assert!(
        text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": 1}}\n</tool_call><|im_end|>"),
        "the earlier call is written as the model would: {text}"
    );
    assert!(text.contains("<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>"), "{text}");
}

#[test]
fn templates_with_tools_render_them_natively_with_arguments_as_objects() {
    let tokenizer = tokenizer_with(QWEN_LIKE);
    let support = TemplateSupport::probe(&tokenizer);
    assert_eq!(support, TemplateSupport { tools: true, tool_calls: true, tool_role: true });
    let tools = request(json!("auto"), true);
    let (messages, extra) = prepare_messages(&history(), Some(&tools), support, ToolCallFormat::Hermes).unwrap();
    let text = tokenizer.apply_chat_template_with(&messages, true, extra.as_ref()).unwrap();
    assert!(text.starts_with("<|im_start|>system\n# Tools\n<tools>{\"type\": \"function\""), "{text}");
    assert!(text.contains("\"arguments\": {\"zone\": 1}}"), "arguments rendered as an object, not a string: {text}");
    assert!(text.contains("<tool_response>\n12:00\n</tool_response>"), "{text}");
    // A history's malformed arguments are the client's error.
    let mut bad = history();
    bad[1].extra.insert("tool_calls".into(), json!([{"function": {"name": "get_time", "arguments": "{oops"}}]));
    assert_eq!(prepare_messages(&bad, Some(&tools), support, ToolCallFormat::Hermes).unwrap_err().field, "messages");
}
