#!/usr/bin/env python3
"""Structured-output cost on a running pagedserve: output tokens/s of JSON-schema requests
against the same requests unconstrained, at a fixed concurrency, and the mask time per engine
step the server reports. Standard library only.

Both modes generate exactly --max-tokens tokens per request: the unconstrained ones with
ignore_eos, the constrained ones under a schema that cannot close sooner (an array of at least
--min-items strings), so the token counts match and only the constraint differs. --strings picks
the items: `bounded` (maxLength 12: a counted regex, whose mask walks the token trie) or `free`
(any string: llguidance's precomputed token slices answer most of the mask). Runs alternate
(plain, json, plain, json, ...) and medians are reported.

Mask time comes from /metrics: pagedserve_engine_step_phase_seconds{phase="constraint_masks"}
(the wall time of one step's masks, computed in parallel while the GPU forward runs) against
{phase="forward"} (launch, overlapped masks, device sampling). Every other step phase the server
reports (schedule, process, the GPU backend's sample_pack / sample_unpack and, one step in 16,
device_forward / device_sample_wait / device_sample) is printed per mode as mean µs per step.

    python3 scripts/bench_structured.py --url http://127.0.0.1:8000 --concurrency 64 --requests 256
"""
import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORDS = ("the model writes a list of short strings about cities rivers mountains and the weather "
         "in many places around the world while the server keeps every token inside the schema").split()


def prompt(i, words):
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


def stream(url, body):
    """Sends one streamed completion; returns its completion tokens (from the usage chunk)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("error"):
                    raise RuntimeError(chunk["error"])
    return tokens


def phase_totals(url):
    """(sum, count) of every engine step phase, keyed by (phase, "sum" | "count")."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if not line.startswith("pagedserve_engine_step_phase_seconds_"):
            continue
        kind = "sum" if "_sum{" in line else "count" if "_count{" in line else None
        if kind:
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            out[(phase, kind)] = float(line.rsplit(" ", 1)[1])
    return out


def run(args, constrained):
    item = {"type": "string", "maxLength": 12} if args.strings == "bounded" else {"type": "string"}
    schema = {"type": "object", "properties": {"items": {"type": "array", "minItems": args.min_items, "items": item}},
              "required": ["items"], "additionalProperties": False}
    bodies = []
    for i in range(args.requests):
        body = {"prompt": prompt(i, args.prompt_words), "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "list", "schema": schema}}
        else:
            body["ignore_eos"] = True
        bodies.append(body)
    before = phase_totals(args.url)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = list(pool.map(lambda b: stream(args.url, b), bodies))
    elapsed = time.perf_counter() - started
    after = phase_totals(args.url)
    delta = lambda phase, kind: after.get((phase, kind), 0.0) - before.get((phase, kind), 0.0)
    steps = delta("forward", "count")
    mask_steps = delta("constraint_masks", "count")
    # Mean µs of each phase over the steps that had it (device_* phases: one step in 16).
    phases = {}
    for phase in sorted({p for p, _ in after}):
        count = delta(phase, "count")
        if count:
            phases[phase] = round(1e6 * delta(phase, "sum") / count, 1)
    return {
        "mode": "json_schema" if constrained else "plain",
        "output_tokens": sum(tokens),
        "short": sum(1 for t in tokens if t != args.max_tokens),
        "seconds": elapsed,
        "tok_s": sum(tokens) / elapsed,
        "mask_us_per_step": 1e6 * delta("constraint_masks", "sum") / mask_steps if mask_steps else 0.0,
        "forward_us_per_step": 1e6 * delta("forward", "sum") / steps if steps else 0.0,
        "steps": steps,
        "phase_us": phases,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--min-items", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--strings", choices=["bounded", "free"], default="bounded")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    # Warm-up: graphs captured, grammar caches filled.
    warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency, "max_tokens": 16})
    run(warm, False)
    run(warm, True)
    results = {"plain": [], "json_schema": []}
    for _ in range(args.reps):
        for constrained in (False, True):
            r = run(args, constrained)
            results[r["mode"]].append(r)
            print(json.dumps(r), flush=True)
    plain = statistics.median(r["tok_s"] for r in results["plain"])
    constrained = statistics.median(r["tok_s"] for r in results["json_schema"])
    mask = statistics.median(r["mask_us_per_step"] for r in results["json_schema"])
    forward = statistics.median(r["forward_us_per_step"] for r in results["json_schema"])
    summary = {"label": args.label, "strings": args.strings, "concurrency": args.concurrency, "plain_tok_s": round(plain),
               "json_schema_tok_s": round(constrained), "ratio": round(constrained / plain, 3),
               "loss_percent": round(100 * (1 - constrained / plain), 1), "mask_us_per_step": round(mask),
               "forward_us_per_step_json": round(forward)}
    for mode, rs in results.items():
        names = sorted({p for r in rs for p in r["phase_us"]})
        summary["phase_us_" + mode] = {p: statistics.median(r["phase_us"].get(p, 0.0) for r in rs) for p in names}
    print("SUMMARY " + json.dumps(summary), flush=True)
    if any(r["short"] for rs in results.values() for r in rs):
        print("warning: some requests stopped before --max-tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
