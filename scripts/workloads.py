"""The load client's deterministic workloads (scripts/bench_http.py), apart so that a tool without the
client's dependencies (scripts/peer/schedule_model.py, scripts/peer/floors.py) draws exactly the same requests: each a list of
prompt token ids and an output length (`max_tokens`, with ignore_eos the exact length)."""

import math
import random


def sharegpt(n, vocab, seed=0, low_id=100):
    rng = random.Random(seed)
    requests = []
    while len(requests) < n:
        prompt_len = int(round(math.exp(rng.gauss(4.72, 0.9))))
        output_len = int(round(math.exp(rng.gauss(5.58, 0.8))))
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        requests.append({"prompt_ids": [rng.randrange(low_id, vocab) for _ in range(prompt_len)], "max_tokens": output_len})
    return requests


def fixed(n, vocab, prompt_len, output_len, seed=0, low_id=100):
    rng = random.Random(seed)
    return [{"prompt_ids": [rng.randrange(low_id, vocab) for _ in range(prompt_len)], "max_tokens": output_len} for _ in range(n)]
