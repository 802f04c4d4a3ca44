"""Smoke test of a running serve.sh server: token-id prompts, ignore_eos, stdlib only.

  python3 scripts/peer/vllm/smoke_client.py PORT [N_PARALLEL] [MAX_TOKENS]

Sends one non-streaming completion (checks usage and returned token ids), one
streaming one (counts chunks), then N_PARALLEL concurrent requests and prints the
aggregate output tokens/s. The server runs with --skip-tokenizer-init, so prompts are
lists of token ids and the returned text is empty; count tokens from usage.
"""
import json
import random
import sys
import threading
import time
import urllib.request

PORT = int(sys.argv[1])
NPAR = int(sys.argv[2]) if len(sys.argv) > 2 else 32
MAXT = int(sys.argv[3]) if len(sys.argv) > 3 else 128
BASE = f"http://127.0.0.1:{PORT}"


def get(path):
    with urllib.request.urlopen(BASE + path, timeout=30) as r:
        return json.loads(r.read())


def post(body, stream=False):
    req = urllib.request.Request(BASE + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


model = get("/v1/models")["data"][0]
name, max_len = model["id"], model.get("max_model_len")
rng = random.Random(0)
prompt = [rng.randrange(100, 40000) for _ in range(64)]
body = {"model": name, "prompt": prompt, "max_tokens": 16, "ignore_eos": True,
        "temperature": 0.0, "return_token_ids": True}
t = time.time()
with post(body) as r:
    out = json.loads(r.read())
u = out["usage"]
ids = out["choices"][0].get("token_ids")
assert u["completion_tokens"] == 16, u
print(f"non-stream: {u} token_ids={ids} ({time.time() - t:.2f}s) model={name} max_model_len={max_len}")

body = {"model": name, "prompt": prompt, "max_tokens": 32, "ignore_eos": True, "temperature": 1.0,
        "stream": True, "stream_options": {"include_usage": True}}
chunks, usage = 0, None
with post(body) as r:
    for raw in r:
        raw = raw.strip()
        if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
            continue
        ev = json.loads(raw[6:])
        if ev.get("choices"):
            chunks += 1
        if ev.get("usage"):
            usage = ev["usage"]
assert usage and usage["completion_tokens"] == 32, usage
print(f"stream: {chunks} chunks, usage {usage}")

done = []


def one(i):
    p = [rng.randrange(100, 40000) for _ in range(128)]
    b = {"model": name, "prompt": p, "max_tokens": MAXT, "ignore_eos": True, "temperature": 1.0}
    with post(b) as r:
        done.append(json.loads(r.read())["usage"]["completion_tokens"])


t = time.time()
th = [threading.Thread(target=one, args=(i,)) for i in range(NPAR)]
for x in th:
    x.start()
for x in th:
    x.join()
dt = time.time() - t
print(f"parallel: {len(done)}/{NPAR} requests x {MAXT} tokens, {sum(done)} output tokens in {dt:.2f}s "
      f"= {sum(done) / dt:.0f} tok/s (smoke only, not a benchmark)")
m = urllib.request.urlopen(BASE + "/metrics", timeout=30).read().decode()
print("metrics:", sum(1 for ln in m.splitlines() if ln.startswith("vllm:")), "vllm:* sample lines")
print("SMOKE OK")
