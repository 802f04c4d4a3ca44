#!/usr/bin/env python3
"""CPU baseline: Hugging Face transformers float32 generate() on the default model.

Measures the same thing as `pagedserve bench --batch-sizes 1,16 --prompt-len 32
--gen-len 64 --repeats 3`: greedy decoding of synthetic prompts of exactly
--prompt-len tokens, exactly --gen-len new tokens per sequence, reporting
decode tokens/s = batch * (gen_len - 1) / (time from the first token to the last),
i.e. excluding prefill.

Prefill is excluded by timing generate() twice: once with max_new_tokens=1
(prefill + first token, t_prefill) and once with max_new_tokens=gen_len (t_full);
decode tok/s = batch * (gen_len - 1) / (t_full - t_prefill), each time being the
median of --repeats runs after one warm-up run. The plain end-to-end rate,
batch * gen_len / t_full, is reported too. As a cross-check, the JSON output
also carries an "in-run" decode rate timed inside the full generate() call from
the first token to the last (through a StoppingCriteria hook), which is the
closest analogue of how the Rust bench times itself.

The model is loaded from the GGUF file with transformers' GGUF loader, which
de-quantizes every tensor (here Q4_1) to float32: the measured model is a plain
float32 LlamaForCausalLM with the same weights values as the GGUF, not a
quantized kernel. Everything runs offline (HF_HUB_OFFLINE=1 is forced).

Run it on an otherwise idle machine. torch's CPU kernels use OpenMP, whose
threads spin at barriers: with --threads equal to the core count and other work
(e.g. a cargo build) on the same cores, single matmuls stall for whole scheduler
time slices and the numbers become erratic and several times too slow. The 1-min
load average is printed (and put in the JSON) so that such runs can be spotted;
on a busy machine --threads 1 gives steadier, if lower, numbers.

Requirements (pip, PyPI only; the versions this was written and run with; also in
scripts/requirements-bench.txt):
    torch==2.15.0          # the PyPI Linux wheel is the CUDA build (+cu132) and
                           # pulls ~2.5 GB of nvidia-*/triton wheels; there is no
                           # CPU-only torch on PyPI. It runs on the CPU regardless.
    transformers==5.24.0
    accelerate==1.15.0     # transformers requires it to load a GGUF file
    gguf==0.19.0
    numpy==2.4.6
    sentencepiece==0.2.3   # not needed for this model (GPT-2 style BPE); harmless

Usage:
    python3 scripts/bench_hf_cpu.py                       # batch 1,16; prompt 32; gen 64; 3 repeats
    python3 scripts/bench_hf_cpu.py --repeats 1 --gen-len 16
    python3 scripts/bench_hf_cpu.py --threads 2 --json     # JSON on stdout (table goes to stderr)
"""

import argparse
import json
import os
import statistics
import sys
import time

# Offline, before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization progress bar

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF file (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default: %(default)s)")
    p.add_argument("--gen-len", type=int, default=64, help="new tokens per sequence (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: os.cpu_count() = %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (human-readable output goes to stderr)")
    args = p.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if args.gen_len < 2:
        p.error("--gen-len must be at least 2")
    if args.prompt_len < 1 or args.repeats < 1 or args.threads < 1 or not args.batch_sizes:
        p.error("--prompt-len, --repeats, --threads and --batch-sizes must be positive")
    return args


def main():
    args = parse_args()
    out = sys.stderr if args.json else sys.stdout

    def say(*a):
        print(*a, file=out, flush=True)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.gguf)),
        gguf_file=os.path.basename(args.gguf),
        dtype=torch.float32,
    )
    load_s = time.perf_counter() - t0
    model.eval()
    cfg = model.config
    vocab = int(cfg.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    eos = cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0]
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    attn_impl = getattr(cfg, "_attn_implementation", None)

    load_before = os.getloadavg()[0]
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads (os.cpu_count() = {os.cpu_count()}), "
        f"1-min load average {load_before:.2f}")
    if load_before > 0.5:
        say("warning: the machine is not idle; timings may be noisy and too slow")
    say(f"model {os.path.basename(args.gguf)} -> {type(model).__name__} ({n_params / 1e6:.1f}M parameters, "
        f"dtype {','.join(param_dtypes)}, attention {attn_impl}), loaded in {load_s:.1f} s")
    say(f"prompt {args.prompt_len} tokens, {args.gen_len} generated per sequence, "
        f"median of {args.repeats} after 1 warm-up, greedy, use_cache=True")

    class FirstTokenTimer(StoppingCriteria):
        """Called once per generation step, after the new token is appended."""

        def __init__(self):
            self.first = None
            self.last = None
            self.steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            now = time.perf_counter()
            self.steps += 1
            if self.first is None:
                self.first = now
            self.last = now
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(input_ids, attention_mask, new_tokens):
        timer = FirstTokenTimer()
        start = time.perf_counter()
        with torch.inference_mode():
            result = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                use_cache=True,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([timer]),
            )
        elapsed = time.perf_counter() - start
        expect = (input_ids.shape[0], input_ids.shape[1] + new_tokens)
        assert tuple(result.shape) == expect, f"generate returned {tuple(result.shape)}, expected {expect}"
        in_run_decode = (timer.last - timer.first) if timer.steps >= 2 else None
        return elapsed, in_run_decode

    say(f"{'batch':>6} {'prefill s':>12} {'decode tok/s':>16} {'ms/step':>14} {'e2e tok/s':>12}")
    results = []
    for batch in args.batch_sizes:
        # Distinct deterministic prompts, the same ids as `pagedserve bench`.
        prompts = [[100 + (b * 7919 + i * 104729) % (vocab - 100) for i in range(args.prompt_len)]
                   for b in range(batch)]
        input_ids = torch.tensor(prompts, dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)

        run(input_ids, attention_mask, args.gen_len)  # warm-up
        prefill_runs, full_runs, in_run = [], [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            prefill_runs.append(run(input_ids, attention_mask, 1)[0])
            full, decode_in_run = run(input_ids, attention_mask, args.gen_len)
            full_runs.append(full)
            in_run.append(decode_in_run)
        t_prefill = statistics.median(prefill_runs)
        t_full = statistics.median(full_runs)
        t_decode = t_full - t_prefill
        decode_tokens = batch * (args.gen_len - 1)
        decode_tps = decode_tokens / t_decode if t_decode > 0 else float("nan")
        step_ms = t_decode / (args.gen_len - 1) * 1e3
        e2e_tps = batch * args.gen_len / t_full
        in_run_med = statistics.median(in_run)
        row = {
            "batch": batch,
            "prefill_s": t_prefill,
            "decode_tok_s": decode_tps,
            "ms_per_step": step_ms,
            "e2e_tok_s": e2e_tps,
            "full_generate_s": t_full,
            "decode_tok_s_in_run": decode_tokens / in_run_med,
            "ms_per_step_in_run": in_run_med / (args.gen_len - 1) * 1e3,
            "prefill_runs_s": prefill_runs,
            "full_runs_s": full_runs,
        }
        results.append(row)
        say(f"{batch:>6} {t_prefill:>12.3f} {decode_tps:>16.1f} {step_ms:>14.1f} {e2e_tps:>12.1f}")

    if args.json:
        print(json.dumps({
            "engine": "hf-transformers",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "model": os.path.basename(args.gguf),
            "model_class": type(model).__name__,
            "parameters": n_params,
            "param_dtypes": param_dtypes,
            "attn_implementation": attn_impl,
            "load_s": load_s,
            "prompt_len": args.prompt_len,
            "gen_len": args.gen_len,
            "repeats": args.repeats,
            "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()
