#!/usr/bin/env python3
"""GPU baseline: Hugging Face transformers bf16 decode on the device, beside `pagedserve bench gpu`.

Builds SmolLM2-135M's architecture (LlamaForCausalLM from its config; weights random, since decode
time does not depend on their values) in bfloat16 on the GPU, prefills `--context` tokens for each
of `--batch` sequences, then times `--steps` greedy decode steps through generate() with the KV
cache: decode ms/step = (t(context + steps new tokens) - t(1 new token)) / (steps - 1), each the
median of `--repeats` runs after a warm-up, synchronised with torch.cuda.synchronize().

Usage: python3 scripts/bench_hf_gpu.py [--batch-sizes 1,256] [--context 512] [--steps 32]
"""
import argparse, statistics, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def smollm2_config():
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                       max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def timed(model, ids, new_tokens, repeats):
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, use_cache=True, pad_token_id=2)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config()).to(device="cuda", dtype=torch.bfloat16).eval()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, SmolLM2-135M shape, bf16, sdpa")
    with torch.no_grad():
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            ids = torch.randint(100, 49000, (batch, args.context - 1), device="cuda")
            t1 = timed(model, ids, 1, args.repeats)
            tn = timed(model, ids, args.steps, args.repeats)
            step_ms = (tn - t1) / (args.steps - 1) * 1e3
            print(f"HF transformers decode step b{batch:<4} c{args.context}  {step_ms:8.3f} ms  {batch / step_ms * 1e3:9.0f} tok/s")


if __name__ == "__main__":
    main()
