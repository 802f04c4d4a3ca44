"""The engine's schedule of a load-client workload, modelled step by step for the tools that price it
(schedule_model.py, floors.py): first-come first-served admission up to `max_num_seqs` sequences and
`max_num_batched_tokens` tokens a step, decode rows included (as `sched::Scheduler` and vLLM count
them), a prompt computed whole in the step that admits it, then one token a step until its output
length (ignore_eos). With `concurrency` below the request count the clients are a closed loop: each
sends its next request in the step after its last one ends."""

from collections import deque


def steps(requests, concurrency, max_num_seqs, max_num_batched_tokens):
    """Yields each step as (the prompt lengths it admits, the contexts of the sequences it decodes);
    `requests` are (prompt length, output length) pairs in the order the clients send them."""
    waiting, queued, running = deque(requests), deque(), []  # running: [prompt, output, generated]
    while waiting or queued or running:
        while waiting and len(queued) + len(running) < concurrency:  # sent and not yet seen to end
            queued.append(waiting.popleft())
        admitted, tokens = [], len(running)
        while queued and len(running) + len(admitted) < max_num_seqs and tokens + queued[0][0] <= max_num_batched_tokens:
            prompt, output = queued.popleft()
            tokens += prompt
            admitted.append([prompt, output, 0])
        yield [p for p, _, _ in admitted], [p + generated for p, _, generated in running]
        # An admitted sequence's first token comes from its prompt.
        for r in running + admitted:
            r[2] += 1
        running = [r for r in running + admitted if r[2] < r[1]]
