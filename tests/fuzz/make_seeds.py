#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (tests/fuzz/seeds/<target>/): small valid examples of
each input, so that libFuzzer starts from the formats' real structure. The seeds are committed;
run this again only to change them. Standard library only."""

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"


def write(target: str, name: str, data: bytes) -> None:
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


# --- GGUF -----------------------------------------------------------------------------------
U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10


def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty: int, v) -> bytes:
    if ty == U32:
        return struct.pack("<I", v)
    if ty == I32:
        return struct.pack("<i", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return struct.pack("<B", int(v))
    if ty == STRING:
        return gguf_str(v)
    if ty == U64:
        return struct.pack("<Q", v)
    if ty == ARRAY:
        inner, items = v
        return struct.pack("<IQ", inner, len(items)) + b"".join(gguf_value(inner, x) for x in items)
    raise ValueError(ty)


def gguf(kvs, tensors, version=3, alignment=32) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, ty, value in kvs:
        out += gguf_str(key) + struct.pack("<I", ty) + gguf_value(ty, value)
    data = b""
    for name, shape, ggml_type, blob in tensors:
        while len(data) % alignment:
            data += b"\0"
        out += gguf_str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", ggml_type, len(data))
        data += blob
    while len(out) % alignment:
        out += b"\0"
    return out + data


def f32s(values) -> bytes:
    return b"".join(struct.pack("<f", v) for v in values)


def q8_0_block(scale_f16: int, quants) -> bytes:
    return struct.pack("<H", scale_f16) + bytes(q & 0xFF for q in quants)


tokens = ["a", "b", "ab", "Ġ", "<|im_start|>", "<|im_end|>"]
tokenizer_kvs = [
    ("tokenizer.ggml.model", STRING, "gpt2"),
    ("tokenizer.ggml.pre", STRING, "smollm"),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
    ("tokenizer.ggml.token_type", ARRAY, (I32, [1, 1, 1, 1, 3, 3])),
    ("tokenizer.ggml.merges", ARRAY, (STRING, ["a b"])),
    ("tokenizer.ggml.bos_token_id", U32, 4),
    ("tokenizer.ggml.eos_token_id", U32, 5),
    ("tokenizer.chat_template", STRING, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"),
]
llama_kvs = [
    ("general.architecture", STRING, "llama"),
    ("llama.context_length", U32, 64),
    ("llama.embedding_length", U32, 8),
    ("llama.block_count", U32, 1),
    ("llama.feed_forward_length", U32, 16),
    ("llama.attention.head_count", U32, 2),
    ("llama.attention.head_count_kv", U32, 1),
    ("llama.rope.freq_base", F32, 10000.0),
    ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
    ("llama.vocab_size", U32, len(tokens)),
]
tensors = [
    ("token_embd.weight", [8, len(tokens)], 0, f32s([0.01 * i for i in range(8 * len(tokens))])),
    ("blk.0.attn_q.weight", [32, 1], 8, q8_0_block(0x3C00, range(-16, 16))),
    ("output_norm.weight", [8], 1, b"\x00\x3c" * 8),
]
write("gguf", "llama_tiny.gguf", gguf(llama_kvs + tokenizer_kvs, tensors))
write("gguf", "metadata_only_v2.gguf", gguf(tokenizer_kvs, [], version=2))
write("gguf", "aligned_64.gguf", gguf([("general.alignment", U32, 64)], tensors[:1], alignment=64))

# --- safetensors (first byte even: a file's header; odd: an index) -------------------------
def safetensors(entries) -> bytes:
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


write("safetensors", "file.bin", b"\0" + safetensors([
    ("model.embed_tokens.weight", "F32", [2, 2], f32s([1, 2, 3, 4])),
    ("model.norm.weight", "BF16", [3], b"\x80\x3f" * 3),
    ("scalar", "F16", [], b"\x00\x3c"),
]))
write("safetensors", "index.bin", b"\1" + json.dumps({
    "metadata": {"total_size": 16},
    "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
}).encode())

# --- request bodies ------------------------------------------------------------------------
requests = {
    "completion": {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
    "completion_many": {"prompt": ["a", [504, 3575]], "n": 2, "max_tokens": 4, "logprobs": 3, "echo": True, "stop": ["\n"], "logit_bias": {"17": -100}, "seed": 7},
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|>"}], "max_completion_tokens": 16, "top_p": 0.9, "top_k": 20},
    "chat_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}], "stream": True, "stream_options": {"include_usage": True}},
    "chat_tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}], "tool_choice": "required"},
    "json_schema": {"messages": [{"role": "user", "content": "A person"}], "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}}, "required": ["name"]}}}},
    "json_object": {"prompt": "{", "response_format": {"type": "json_object"}, "max_tokens": 8},
    "regex": {"prompt": "Date:", "structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}, "max_tokens": 8},
    "choice": {"prompt": "Yes or no?", "structured_outputs": {"choice": ["yes", "no"]}},
}
for name, body in requests.items():
    write("request", f"{name}.json", json.dumps(body).encode())

# --- chat messages (first byte: which template, and whether to add the generation prompt) ----
conversations = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a<|im_end|>\n<|im_start|>system\nb"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "<start_of_turn>model [INST] <s></s> <|eot_id|>"}, {"role": "tool", "content": "{}", "tool_call_id": "1"}],
    [{"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}],
]
for i, messages in enumerate(conversations):
    for which in (i, 0x80 | (i + 3)):
        write("chat_template", f"conversation_{i}_{which:02x}.bin", bytes([which]) + json.dumps(messages).encode())

# --- token streams (first byte: flags; then u16 ids) ----------------------------------------
reference = HERE.parent.parent.parent / "shared" / "reference" / "smollm2_subset.json"
streams = [[19556, 28, 905, 17], [1, 2, 3, 0, 0, 49151], [2899, 1898, 2, 256, 1296]]
if reference.exists():
    ref = json.loads(reference.read_text())
    streams += [t["ids"] for t in ref["tokenize"]]
for i, ids in enumerate(streams):
    flags = [0, 1, 4 | 1, 6][i % 4]
    write("detokenizer", f"stream_{i:02}.bin", bytes([flags]) + b"".join(struct.pack("<H", t) for t in ids))

# --- plugin answers (any bytes; a few shapes to start from) ---------------------------------
for i, blob in enumerate([bytes(range(32)), bytes([1] + [0] * 40), bytes([2, 1, 0x90, 0x01] + [5] * 20), bytes([3, 2] + [0xFF] * 24)]):
    write("plugin_answers", f"answer_{i}.bin", blob)
