#!/usr/bin/env python3
"""CPU serving baseline: HF transformers float32 generate() replaying `pagedserve bench serve`'s workload.

transformers has no serving loop, so the closest baseline for 16 concurrent clients is static
batching: the workload's requests (written by `pagedserve bench serve --dump-workload FILE`) are
taken 16 at a time in order, left-padded, and each batch generates until its longest request is
done (greedy, EOS ignored, like the pagedserve run). Output throughput counts only the tokens each
request asked for, over the wall time of all batches.

Usage: python3 scripts/bench_hf_cpu_serve.py --workload FILE [--batch 16] [--threads N]
Requirements: scripts/requirements-bench.txt.
"""
import argparse, json, os, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--gguf", default=os.path.join(os.path.dirname(__file__), "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = json.load(open(args.workload))
    path = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{len(workload)} requests in static batches of {args.batch}")
    useful = prompt_tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(workload), args.batch):
            group = workload[start:start + args.batch]
            width = max(len(r["prompt"]) for r in group)
            ids = torch.tensor([[2] * (width - len(r["prompt"])) + r["prompt"] for r in group])
            mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in group])
            new = max(r["max_tokens"] for r in group)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           use_cache=True, pad_token_id=2)
            useful += sum(r["max_tokens"] for r in group)
            prompt_tokens += sum(len(r["prompt"]) for r in group)
    seconds = time.perf_counter() - started
    print(f"{seconds:.1f} s, {prompt_tokens} prompt + {useful} output tokens")
    print(f"output throughput {useful / seconds:10.1f} tokens/s")
    print(f"total throughput  {(useful + prompt_tokens) / seconds:10.1f} tokens/s")


if __name__ == "__main__":
    main()
