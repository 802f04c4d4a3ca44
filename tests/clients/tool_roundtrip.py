#!/usr/bin/env python3
"""A tool-call round trip against a running pagedserve with the official OpenAI Python client.

1. The client offers a `get_weather` tool and requires a call: the model calls it; the arguments
   are JSON that fits the tool's schema, and `finish_reason` is `tool_calls`.
2. The same request streamed: the client's deltas reassemble (by index, arguments appended) to
   the same function name and arguments.
3. The client runs the tool and sends the assistant's call and the tool's result back: the model
   answers in text, with no further call (`tool_choice: "none"`), or may call again (`auto`).

Usage: python3 tests/clients/tool_roundtrip.py http://127.0.0.1:PORT/v1
Prints "round trip ok" at the end; any failure raises.
"""
import json
import sys

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}]


def get_weather(city, unit):
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "sunny"}


def main():
    client = OpenAI(base_url=sys.argv[1], api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    common = dict(model=model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=100, temperature=0)

    first = client.chat.completions.create(messages=messages, **common)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice.message
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather", call
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit"), arguments
    print("call:", call.function.name, call.function.arguments)

    pieces = {}
    finish = None
    for chunk in client.chat.completions.create(messages=messages, stream=True, **common):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = pieces.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] = d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert list(pieces) == [0] and pieces[0]["id"], pieces
    assert (pieces[0]["name"], pieces[0]["arguments"]) == (call.function.name, call.function.arguments), pieces
    print("streamed call reassembles:", pieces[0]["name"], pieces[0]["arguments"])

    result = get_weather(**arguments)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=40, temperature=0)
    answer = final.choices[0]
    assert answer.message.content and answer.message.content.strip(), answer
    assert not answer.message.tool_calls, answer
    assert answer.finish_reason in ("stop", "length"), answer
    print("answer:", answer.message.content.strip())
    print("round trip ok")


if __name__ == "__main__":
    main()
