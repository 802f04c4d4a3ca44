#!/usr/bin/env python3
"""Which engine steps of the 1000-request ShareGPT-like run (the client's `sharegpt` workload, seed 0,
from scripts/workloads.py) could replay a CUDA graph, and which run eager: a model of the schedule, not a
measurement.

The schedule is scripts/peer/schedule.py's (first-come first-served up to --max-num-seqs sequences and
--max-num-batched-tokens tokens a step, decode rows included); the time columns reuse the step-time fit
(H100) of session 30's `results/2026-12-06/session30/sg_schedule_model.py`, whose budget counted prompt
tokens only. (That model drew its lengths without the prompt ids,
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
from peer.schedule import steps as schedule  # noqa: E402
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
steps = {"graph": [0, 0.0], "eager decode": [0, 0.0], "mixed": [0, 0.0]}
for prompts, contexts in schedule(requests, len(requests), args.max_num_seqs, args.max_num_batched_tokens):
    prompt_tokens = sum(prompts)
    rows = len(prompts) + len(contexts)
    positions = sum(contexts) + prompt_tokens
    seconds = 5.6e-3 + rows * 22e-6 + prompt_tokens * 25e-6 + positions * KV_BYTES_PER_POSITION / 3.0e12
    kind = "mixed" if prompt_tokens else ("graph" if rows <= args.largest_bucket else "eager decode")
    steps[kind][0] += 1
    steps[kind][1] += seconds
total = sum(s for _, s in steps.values())
print(f"{sum(n for n, _ in steps.values())} steps, {total:.2f} s (session 30's H100 fit)")
for kind, (n, s) in steps.items():
    overhead = n * args.eager_ms / 1e3
    extra = "" if kind == "graph" else f", about {overhead:.2f} s of it eager overhead ({100 * overhead / total:.1f}%)"
    print(f"  {kind:<13} {n:>5} steps, {s:6.2f} s{extra}")
