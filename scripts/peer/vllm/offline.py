"""Fallback path (b): vLLM's offline engine on token-id prompts, dummy weights.

  source scripts/peer/vllm/env.sh
  python3 scripts/peer/vllm/offline.py CONFIG_DIR [--num-prompts 512] [--input-len 128]
        [--output-len 128] [--max-num-seqs N] [--max-model-len N] [--enforce-eager]
        [--temperature 1.0] [--json OUT.json]

Generates with SamplingParams(ignore_eos=True, detokenize=False), so every request
produces exactly --output-len tokens, and prints one JSON line of throughput figures.
"""
import argparse
import json
import random
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=a.config_dir, load_format="dummy", skip_tokenizer_init=True,
              gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager,
              seed=a.seed)
    if a.max_num_seqs:
        kw["max_num_seqs"] = a.max_num_seqs
    if a.max_model_len:
        kw["max_model_len"] = a.max_model_len
    t0 = time.perf_counter()
    llm = LLM(**kw)
    t_init = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(a.seed)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(a.input_len)])
               for _ in range(a.num_prompts)]
    sp = SamplingParams(max_tokens=a.output_len, ignore_eos=True, temperature=a.temperature,
                        detokenize=False)
    # warm-up (first batch pays for lazy kernel loads)
    llm.generate(prompts[: min(8, len(prompts))], sp, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    res = {"config": a.config_dir, "num_prompts": a.num_prompts, "input_len": a.input_len,
           "output_len": a.output_len, "elapsed_s": round(dt, 3), "init_s": round(t_init, 1),
           "output_tok_s": round(n_out / dt, 1), "total_tok_s": round((n_in + n_out) / dt, 1),
           "requests_s": round(len(outs) / dt, 2), "all_full_length": n_out == a.num_prompts * a.output_len,
           "enforce_eager": a.enforce_eager}
    print(json.dumps(res), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
