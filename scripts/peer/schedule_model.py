#!/usr/bin/env python3
"""Which engine steps of the 1000-request ShareGPT-like run (the client's `sharegpt` workload, seed 0,
from scripts/workloads.py) could replay a CUDA graph, and which run eager: a model of the schedule, not a
measurement.

Admission is first-come first-served up to --max-num-seqs sequences and --max-num-batched-tokens prompt
tokens a step, as in session 30's `results/2026-12-06/session30/sg_schedule_model.py`, whose step-time
fit (H100) this reuses for the time columns. (That model drew its lengths without the prompt ids,
so its requests are another sample of the same distribution, not the client's.) A step is
  * `graph`: decode rows only, at most the largest graph bucket (`launch::GRAPH_BUCKETS`);
  * `eager decode`: decode rows only, more than that;
  * `mixed`: it carries prompt tokens (always eager).
An eager step costs about 0.5 ms more than its graph on an H100 at 256 rows (BENCHMARKS.md, session 34).

    python3 scripts/peer/schedule_model.py [--largest-bucket 256] [--max-num-seqs 512]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from workloads import sharegpt  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--largest-bucket", type=int, default=256)
parser.add_argument("--max-num-seqs", type=int, default=512)
parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
parser.add_argument("--vocab", type=int, default=128256, help="the model's vocabulary (Llama-3.1-8B's by default)")
parser.add_argument("--eager-ms", type=float, default=0.5, help="what an eager step costs beyond its graph")
args = parser.parse_args()

# The client's own requests (the lengths depend on the vocabulary: the prompt ids share the draws).
requests = [(len(r["prompt_ids"]), r["max_tokens"]) for r in sharegpt(1000, args.vocab)]

KV_BYTES_PER_POSITION = 4096 * 32
waiting, running = list(requests), []
steps = {"graph": [0, 0.0], "eager decode": [0, 0.0], "mixed": [0, 0.0]}
while waiting or running:
    prompt_tokens = 0
    while waiting and len(running) < args.max_num_seqs and prompt_tokens + waiting[0][0] <= args.max_num_batched_tokens:
        prompt, output = waiting.pop(0)
        prompt_tokens += prompt
        running.append([prompt, output, 0])
    rows = len(running)
    positions = sum(p + done for p, _, done in running)
    seconds = 5.6e-3 + rows * 22e-6 + prompt_tokens * 25e-6 + positions * KV_BYTES_PER_POSITION / 3.0e12
    kind = "mixed" if prompt_tokens else ("graph" if rows <= args.largest_bucket else "eager decode")
    steps[kind][0] += 1
    steps[kind][1] += seconds
    for r in running:
        r[2] += 1
    running = [r for r in running if r[2] < r[1]]
total = sum(s for _, s in steps.values())
print(f"{sum(n for n, _ in steps.values())} steps, {total:.2f} s (session 30's H100 fit)")
for kind, (n, s) in steps.items():
    overhead = n * args.eager_ms / 1e3
    extra = "" if kind == "graph" else f", about {overhead:.2f} s of it eager overhead ({100 * overhead / total:.1f}%)"
    print(f"  {kind:<13} {n:>5} steps, {s:6.2f} s{extra}")
