#!/usr/bin/env python3
"""Model folders for the side-by-side benchmark: for each shape in scripts/peer/vllm/configs
(the published configs vLLM is served from), OUT/SHAPE holds the same config.json and
generation_config.json plus a tokenizer.json whose vocabulary covers every id of the model.

pagedserve needs a tokenizer to serve (it detokenizes every streamed token); vLLM runs with
--skip-tokenizer-init and does not. With dummy weights the generated ids are spread over the
whole vocabulary, so the tokenizer must name all of them, or most streamed tokens would be
empty text and the client could not time them. The tokenizer is a word-level one ("w17",
"w18", ...; decoding joins them with spaces); the config's bos and eos ids are its special
tokens. Standard library only, so it runs on the GPU machine as is.

    python3 scripts/peer/make_model_dirs.py OUT [SHAPE...]
"""

import json
import os
import shutil
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm", "configs")


def special_ids(config):
    ids = set()
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def tokenizer_json(vocab_size, specials):
    names = [f"<special_{i}>" if i in specials else f"w{i}" for i in range(vocab_size)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": names[i], "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i in sorted(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {name: i for i, name in enumerate(names)}, "unk_token": names[0]},
    }


def make(shape, out):
    source = os.path.join(CONFIGS, shape)
    target = os.path.join(out, shape)
    os.makedirs(target, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(target, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(config["vocab_size"], special_ids(config)), f)
    return target


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    shapes = sys.argv[2:] or sorted(os.listdir(CONFIGS))
    for shape in shapes:
        print(make(shape, sys.argv[1]))


if __name__ == "__main__":
    main()
