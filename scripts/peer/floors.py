#!/usr/bin/env python3
"""The fastest a GPU could serve one of the load client's workloads at the Llama-3.1-8B shape in bf16:
a lower bound on the run's time, so that a measured tok/s (ours, vLLM's, a target) reads as a fraction
of what the machine allows. A model of the schedule, not a measurement; no GPU.

The requests are the client's own (scripts/workloads.py, seed 0), under the schedule both servers run
(scripts/peer/schedule.py: first-come first-served under --max-num-seqs and --max-num-batched-tokens, a
prompt whole in the step that admits it, where a chunked one would only add steps; below the request
count the concurrency is a closed loop). Each step costs at least the larger of
  * its bytes at the copy rate: the weights it streams (every layer's products and the head: the
    embedding table is only gathered), the cache it reads (every decode row's context, keys and values
    of every layer) and the cache it writes;
  * its FLOPs at the dense bf16 peak: 2 per weight per token through the layers, 2 per head weight per
    row that gets logits, and attention's 4 per head dimension per (query, key) pair.
Perfect overlap of the two, no launch gaps, no host time, no sampling: no real step reaches it. The
second floor runs attention after the products, as both servers do within a layer: each step the larger
of the weights' bytes and the products' FLOPs, plus the larger of the cache's bytes and attention's FLOPs.

    python3 scripts/peer/floors.py sharegpt:1000:1000 [--copy-gbps 4300] [--tflops 989] [--measured NAME=TOK_S ...]
    python3 scripts/peer/floors.py fixed:128:128:256:32 --measured ours=5617.3 vllm=5090.3

Defaults are the H200's: the copy rate `bench gpu` measures there (about 4.3 TB/s) and the SXM part's
dense bf16 peak (989 TFLOPS).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from peer.schedule import steps as schedule  # noqa: E402
from workloads import fixed, sharegpt  # noqa: E402

# Llama-3.1-8B.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256
LAYER_WEIGHTS = LAYERS * (HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTER)
HEAD_WEIGHTS = HIDDEN * VOCAB
KV_BYTES_PER_POSITION = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
ATTENTION_FLOPS_PER_PAIR = LAYERS * HEADS * HEAD_DIM * 4


def requests_of(spec, vocab):
    """`bench_device.sh`'s workload spec: (prompt length, output length) of each request, and the concurrency."""
    kind, *numbers = spec.split(":")
    try:
        if kind == "sharegpt":
            n, concurrency = map(int, numbers)
            made = sharegpt(n, vocab)
        elif kind == "fixed":
            prompt_len, output_len, n, concurrency = map(int, numbers)
            made = fixed(n, vocab, prompt_len, output_len)
        else:
            raise ValueError
    except ValueError:
        raise SystemExit(f"a workload is sharegpt:N:CONCURRENCY or fixed:IN:OUT:N:CONCURRENCY, not {spec!r}")
    return [(len(r["prompt_ids"]), r["max_tokens"]) for r in made], concurrency


def step_floors(prompts, decode_contexts, bandwidth, flops_peak):
    """Seconds at least for a step computing `prompts` whole and one token for each decode context:
    (products and attention overlapped, one after the other)."""
    tokens = sum(prompts) + len(decode_contexts)
    rows_with_logits = len(prompts) + len(decode_contexts)
    product_flops = 2 * LAYER_WEIGHTS * tokens + 2 * HEAD_WEIGHTS * rows_with_logits
    attention_flops = ATTENTION_FLOPS_PER_PAIR * (sum(decode_contexts) + sum(p * (p + 1) // 2 for p in prompts))
    weight_bytes = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS)
    cache_bytes = KV_BYTES_PER_POSITION * (sum(decode_contexts) + tokens)
    overlapped = max((weight_bytes + cache_bytes) / bandwidth, (product_flops + attention_flops) / flops_peak)
    # Kernels one after another (as both servers run a layer): the products bound by the weights
    # or their FLOPs, then attention by the cache or its FLOPs.
    sequential = max(weight_bytes / bandwidth, product_flops / flops_peak) + max(cache_bytes / bandwidth, attention_flops / flops_peak)
    return overlapped, sequential


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", help="sharegpt:N:CONCURRENCY or fixed:IN:OUT:N:CONCURRENCY, as bench_device.sh takes it")
    parser.add_argument("--copy-gbps", type=float, default=4300.0)
    parser.add_argument("--tflops", type=float, default=989.0)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--measured", nargs="*", default=[], metavar="NAME=TOK_S", help="figures to read against the floor")
    args = parser.parse_args()
    bandwidth, flops_peak = args.copy_gbps * 1e9, args.tflops * 1e12

    requests, concurrency = requests_of(args.workload, VOCAB)
    output_tokens = sum(out for _, out in requests)
    seconds, sequential_seconds, steps = 0.0, 0.0, 0
    for prompts, contexts in schedule(requests, concurrency, args.max_num_seqs, args.max_num_batched_tokens):
        overlapped, sequential = step_floors(prompts, contexts, bandwidth, flops_peak)
        seconds += overlapped
        sequential_seconds += sequential
        steps += 1
    weight_seconds = steps * 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) / bandwidth

    floor, sequential_floor = output_tokens / seconds, output_tokens / sequential_seconds
    print(f"{args.workload}: {output_tokens:,} output tokens in {steps:,} steps "
          f"({args.copy_gbps:,.0f} GB/s copy, {args.tflops:,.0f} TFLOPS dense bf16)")
    print(f"floor: {seconds:.2f} s, {floor:,.0f} output tok/s; with attention after the products, not beside them: "
          f"{sequential_seconds:.2f} s, {sequential_floor:,.0f} tok/s; the weights alone, once a step: {weight_seconds:.2f} s")
    for item in args.measured:
        name, value = item.split("=")
        print(f"  {name:<24} {float(value):>9,.1f} tok/s  {float(value) / floor:6.1%} of the floor, {float(value) / sequential_floor:6.1%} of the sequential one")


if __name__ == "__main__":
    main()
