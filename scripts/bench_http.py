#!/usr/bin/env python3
"""HTTP load client for any OpenAI-compatible server (pagedserve, vLLM): a deterministic workload of
token-id prompts sent to /v1/completions with ignore_eos and greedy decoding, all at once or at a
fixed concurrency (closed loop), streamed or not, timed on the client so that every server is
measured the same way. Prints one JSON line: output tok/s, requests/s, latency and (streamed)
TTFT/TPOT percentiles, and, against pagedserve, the engine's step phases over the run (from
/metrics), to tell engine time from HTTP time.

    python3 scripts/bench_http.py URL --workload sharegpt --n 1000 --concurrency 1000 --vocab 49152 [--no-stream]

Workloads: `sharegpt` (log-normal input and output lengths fitted to the ShareGPT statistics of the
vLLM paper: mean input ~161 tokens, output ~338; input 4..1024, input + output <= 2048), or
`fixed:IN:OUT`. Requires aiohttp.
"""

import argparse
import asyncio
import json
import re
import time

import aiohttp

from workloads import fixed, sharegpt


async def one(session, url, model, request, stream, results, token_ids=False):
    body = {"model": model, "prompt": request["prompt_ids"], "max_tokens": request["max_tokens"], "ignore_eos": True,
            "temperature": 0, "stream": stream}
    if token_ids:
        # vLLM started with --skip-tokenizer-init streams empty text: a chunk's tokens are its token_ids.
        body["return_token_ids"] = True
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first = last = usage = error = None
    chunks = 0
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                error = f"{response.status} {(await response.text())[:200]}"
            elif not stream:
                usage = (await response.json())["usage"]
            else:
                buffer = b""
                async for data in response.content.iter_any():
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            choice = (chunk.get("choices") or [{}])[0]
                            if choice.get("text") or choice.get("token_ids"):
                                last = time.perf_counter()
                                first = first or last
                                chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        error = repr(e)
    ended = time.perf_counter()
    out = usage["completion_tokens"] if usage else chunks
    results.append({
        "ok": error is None, "error": error, "out": out, "want": request["max_tokens"], "latency": ended - started,
        "ttft": first - started if first else None,
        "tpot": (last - first) / (out - 1) if first and last and out > 1 else None,
    })


def percentile(values, p):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


async def step_phases(session, url):
    """pagedserve's `engine_step_phase_seconds` sums by phase (empty for other servers)."""
    try:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    sums = {}
    for m in re.finditer(r'^pagedserve_engine_step_phase_seconds_(sum|count)\{[^}]*phase="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        sums.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return sums


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--label", default="")
    ap.add_argument("--token-ids", action="store_true",
                    help="ask for return_token_ids and count streamed tokens by them (vLLM with --skip-tokenizer-init)")
    a = ap.parse_args()
    stream = not a.no_stream
    if a.workload == "sharegpt":
        requests = sharegpt(a.n, a.vocab, a.seed)
    else:
        _, prompt_len, output_len = a.workload.split(":")
        requests = fixed(a.n, a.vocab, int(prompt_len), int(output_len), a.seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600), connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(a.url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        # Warm-up, not counted.
        await asyncio.gather(*(one(session, a.url, model, {"prompt_ids": requests[0]["prompt_ids"][:8], "max_tokens": 4}, stream, [], a.token_ids) for _ in range(2)))
        before = await step_phases(session, a.url)
        gate, results = asyncio.Semaphore(a.concurrency), []

        async def gated(request):
            async with gate:
                await one(session, a.url, model, request, stream, results, a.token_ids)

        started = time.perf_counter()
        await asyncio.gather(*(gated(r) for r in requests))
        seconds = time.perf_counter() - started
        after = await step_phases(session, a.url)
    ok = [r for r in results if r["ok"]]
    out = sum(r["out"] for r in ok)
    report = {
        "label": a.label, "workload": a.workload, "stream": stream, "requests": a.n, "concurrency": a.concurrency,
        "failed": len(results) - len(ok), "short": sum(1 for r in ok if r["out"] != r["want"]),
        "seconds": round(seconds, 2), "output_tok_per_s": round(out / seconds, 1), "req_per_s": round(len(ok) / seconds, 2),
        "latency_s_p50": round(percentile([r["latency"] for r in ok], 50), 3),
    }
    if stream:
        for key in ("ttft", "tpot"):
            for p in (50, 99):
                v = percentile([r[key] for r in ok], p)
                report[f"{key}_ms_p{p}"] = round(v * 1000, 2) if v is not None else None
    phases = {k: round(after[k].get("sum", 0) - before.get(k, {}).get("sum", 0), 2) for k in after}
    if phases:
        report["engine_phase_seconds"] = phases
        steps = after.get("forward", {}).get("count", 0) - before.get("forward", {}).get("count", 0)
        report["engine_steps"] = int(steps)
        # Each phase's mean over the steps that observed it (the device_* phases are timed on
        # one step in 16), in microseconds: the sums above round a short phase away.
        means = {}
        for k in after:
            count = after[k].get("count", 0) - before.get(k, {}).get("count", 0)
            if count > 0:
                means[k] = round((after[k].get("sum", 0) - before.get(k, {}).get("sum", 0)) / count * 1e6, 1)
        report["engine_phase_us_mean"] = means
    errors = [r["error"] for r in results if not r["ok"]][:3]
    if errors:
        report["errors"] = errors
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
