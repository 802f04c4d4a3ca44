#!/usr/bin/env python3
"""A model of the 1000-request ShareGPT-like run's schedule (session 30, BENCHMARKS.md): the client's request lengths
(scripts/bench_http.py's `sharegpt`, seed 0), first-come first-served admission up to 512 sequences and 8,192 prompt
tokens a step, and a step time fitted by hand to the H100 runs of this session: 5.6 ms + 22 µs a decode row + 25 µs a
prompt token + the cache bytes read at 3.0 TB/s. It gave 28.97 s and 1,912 steps against the measured 28.4 s and 1,935.
Prints the run's time by rows in the step and the steps by rows. A model, not a measurement: it says where the time
would go, not what a change would gain."""
import math
import random

rng = random.Random(0)
requests = []
while len(requests) < 1000:
    prompt = int(round(math.exp(rng.gauss(4.72, 0.9))))
    output = int(round(math.exp(rng.gauss(5.58, 0.8))))
    if prompt < 4 or output < 4 or prompt > 1024 or prompt + output > 2048:
        continue
    requests.append((prompt, output))
print("mean in", sum(p for p, _ in requests) / 1000, "mean out", sum(o for _, o in requests) / 1000, "longest out", max(o for _, o in requests))

KV_BYTES_PER_POSITION = 4096 * 32  # 8 KV heads x 128 x (K, V) x bf16, 32 layers
waiting, running, clock, steps = list(requests), [], 0.0, 0
time_by_rows, steps_by_rows = {}, {}
while waiting or running:
    prompt_tokens = 0
    while waiting and len(running) < 512 and prompt_tokens + waiting[0][0] <= 8192:
        prompt, output = waiting.pop(0)
        prompt_tokens += prompt
        running.append([prompt, output, 0])
    rows = len(running)
    positions = sum(p + done for p, _, done in running)
    step = 5.6e-3 + rows * 22e-6 + prompt_tokens * 25e-6 + positions * KV_BYTES_PER_POSITION / 3.0e12
    clock += step
    steps += 1
    band = min(rows // 64, 8)
    time_by_rows[band] = time_by_rows.get(band, 0.0) + step
    steps_by_rows[band] = steps_by_rows.get(band, 0) + 1
    for r in running:
        r[2] += 1
    running = [r for r in running if r[2] < r[1]]
total_out = sum(o for _, o in requests)
print(f"{clock:.2f} s, {steps} steps, {total_out / clock:.0f} output tok/s")
for band in sorted(time_by_rows):
    label = f"{band * 64}-{band * 64 + 63}" if band < 8 else "512"
    print(f"rows {label:>8}: {time_by_rows[band]:6.2f} s in {steps_by_rows[band]} steps")
