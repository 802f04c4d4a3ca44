#!/usr/bin/env python3
"""Smoke test of a running pagedserve over HTTP, with nothing but the standard library: for use
where the Rust test suite cannot run (the GPU machine, which gets only the binary).

Checks, printing one line each and exiting non-zero on any failure:
- concurrent streaming greedy requests complete, and identical ones give identical text (how many
  equal their unloaded answers is printed: exact on the CPU, not guaranteed by bf16 GPU kernels);
- a seeded sampled request (temperature, top-p, top-k, min-p, penalties) repeats exactly, and
  comes back the same while other requests run;
- n = 2 returns two choices; logprobs come back with the requested number of alternatives;
- a request with a bad field gets a 400 naming it;
- structured outputs hold whatever the weights: a regex with n = 3, a choice, and a JSON schema
  (constrained rows of a GPU batch are masked before sampling, so this runs that path).

Usage: python3 scripts/smoke_serve.py [--url http://127.0.0.1:8000] [--concurrency 8]
"""
import argparse, json, re, sys, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "The three primary colors are", "Water boils at", "In 1969, humans", "The quick brown fox"]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def complete(base, body):
    status, text = post(base + "/v1/completions", body)
    assert status == 200, (status, text)
    return json.loads(text)


def stream_text(base, body):
    status, text = post(base + "/v1/completions", dict(body, stream=True))
    assert status == 200, (status, text)
    out = ""
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            out += "".join(c.get("text", "") for c in chunk.get("choices", []))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    base, failures = args.url, 0

    def check(name, ok, detail=""):
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")

    greedy = [{"prompt": p, "max_tokens": 32, "temperature": 0} for p in PROMPTS[: args.concurrency]]
    alone = [complete(base, b)["choices"][0]["text"] for b in greedy]
    with ThreadPoolExecutor(args.concurrency) as pool:
        streamed = list(pool.map(lambda b: stream_text(base, b), greedy))
    check("concurrent greedy streams all complete", all(streamed), f"{sum(map(bool, streamed))}/{len(greedy)}")
    # On the CPU path every token is batch-invariant; on the GPU the bf16 kernels (a GEMV below 9
    # rows, cuBLAS above) round differently per batch size, so a greedy text may leave its unloaded
    # twin at a near-tie. Reported, not judged; the exact property checked on the GPU is the next.
    same = sum(a == s for a, s in zip(alone, streamed))
    print(f"info concurrent streams equal to their unloaded answers: {same}/{len(greedy)}")
    twins = {"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0}
    with ThreadPoolExecutor(args.concurrency) as pool:
        copies = list(pool.map(lambda b: stream_text(base, b), [twins] * args.concurrency))
    check("identical concurrent greedy streams are identical", len(set(copies)) == 1 and copies[0], repr(copies[0][:40]))

    seeded = {"prompt": "Write a short poem about the sea.", "max_tokens": 48, "temperature": 0.8, "top_p": 0.95,
              "top_k": 40, "min_p": 0.02, "presence_penalty": 0.3, "frequency_penalty": 0.2, "seed": 1234,
              "ignore_eos": True}
    first = complete(base, seeded)["choices"][0]["text"]
    again = complete(base, seeded)["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        busy = list(pool.map(lambda b: complete(base, b)["choices"][0]["text"], [seeded] + greedy[:3]))[0]
    check("seeded sampling repeats, alone and under load", first and first == again == busy, repr(first[:40]))
    other = complete(base, dict(seeded, seed=99))["choices"][0]["text"]
    check("another seed draws differently", other != first)

    two = complete(base, {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "n": 2, "seed": 7})
    check("n=2 returns two choices", len(two["choices"]) == 2, f"{[c['text'][:20] for c in two['choices']]}")

    lp = complete(base, {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 3})
    top = lp["choices"][0]["logprobs"]["top_logprobs"]
    check("logprobs with 3 alternatives", len(top) == 4 and all(len(t) >= 3 for t in top),
          json.dumps(top[0])[:80])

    years = complete(base, {"prompt": "The year was", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 3,
                            "structured_outputs": {"regex": "[12][0-9]{3}"}})
    texts = [c["text"] for c in years["choices"]]
    check("regex-constrained n=3 all match", len(texts) == 3 and all(re.fullmatch("[12][0-9]{3}", t) for t in texts),
          repr(texts))
    pick = complete(base, {"prompt": "Pick one:", "max_tokens": 8, "temperature": 0,
                           "structured_outputs": {"choice": ["red", "green", "blue"]}})["choices"][0]["text"]
    check("choice-constrained output is one of the choices", pick in ("red", "green", "blue"), repr(pick))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
              "additionalProperties": False}
    body = {"prompt": "A person as JSON:", "max_tokens": 64, "temperature": 0.7, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    outs = [complete(base, body)["choices"][0], stream_text(base, body)]

    def valid(text):
        try:
            v = json.loads(text)
        except ValueError:
            return False
        return set(v) == {"name", "age"} and isinstance(v["age"], int) and 0 <= v["age"] <= 120

    ok = outs[0]["finish_reason"] == "length" or valid(outs[0]["text"])
    check("json_schema output parses and fits the schema (or stopped at max_tokens)", ok, repr(outs[0]["text"][:60]))
    check("json_schema streamed equals non-streamed (seeded)", outs[1] == outs[0]["text"], repr(outs[1][:60]))

    status, text = post(base + "/v1/completions", {"prompt": "hi", "max_tokens": 4, "top_p": 7})
    check("a bad field gets 400 naming it", status == 400 and "top_p" in text, text[:100])
    print(f"{failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
