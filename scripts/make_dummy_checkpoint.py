#!/usr/bin/env python3
"""A Hugging Face checkpoint of random bfloat16 weights for a Llama-shaped `config.json`, in
safetensors shards with their index: what `bench_load.py` loads to measure load time and host
memory at real sizes (8B: 16 GB) without downloading a model. Standard library and torch only.

    python3 scripts/make_dummy_checkpoint.py CONFIG_DIR OUT_DIR [--shard-gib 5]

CONFIG_DIR holds config.json (and tokenizer files, copied along).
"""

import argparse
import json
import os
import shutil
import struct

import torch


def tensors(c):
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim", h // heads)
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (heads * hd, h)
        yield p + "self_attn.k_proj.weight", (kv * hd, h)
        yield p + "self_attn.v_proj.weight", (kv * hd, h)
        yield p + "self_attn.o_proj.weight", (h, heads * hd)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not c.get("tie_word_embeddings", False):
        yield "lm_head.weight", (vocab, h)


def write_shard(path, items):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in items:
        n = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            f.write(t.view(torch.int16).numpy().tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--shard-gib", type=float, default=5.0)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for f in os.listdir(args.config_dir):
        shutil.copy(os.path.join(args.config_dir, f), args.out_dir)
    c = json.load(open(os.path.join(args.config_dir, "config.json")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    shards, current, size, limit = [], [], 0, int(args.shard_gib * (1 << 30))
    for name, shape in tensors(c):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.rand(shape, generator=g, device=device, dtype=torch.float32) * 0.0693 - 0.0346).to(torch.bfloat16).cpu()
        if current and size + t.numel() * 2 > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += t.numel() * 2
    shards.append(current)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(args.out_dir, fname), items)
        for name, t in items:
            weight_map[name] = fname
            total += t.numel() * 2
    with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(json.dumps({"out": args.out_dir, "shards": len(shards), "gib": round(total / (1 << 30), 2)}))


if __name__ == "__main__":
    main()
