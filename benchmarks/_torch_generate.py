"""transformers greedy `generate` on a random NemotronH (the reference side of decode_vs_torch.py).

Run with the reference Python (`scripts/setup_reference.sh`; $CASCADE_REF_PYTHON overrides it):
    .venv-ref/bin/python benchmarks/_torch_generate.py --config cfg.json --prompts p.json --save DIR --new 256
Builds the model from the config with a fixed seed, saves it to DIR (HF layout, so cascade_jax loads the
same weights), then times one batched greedy generate of every prompt (left-padded, KV + Mamba cache).
Prints one JSON line: seconds and generated tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM

transformers.logging.set_verbosity_error()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--new", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    with open(args.config) as f:
        config = NemotronHConfig(**json.load(f))
    model = NemotronHForCausalLM(config).eval()
    model.save_pretrained(args.save)
    with open(args.prompts) as f:
        prompts = json.load(f)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    settings = dict(attention_mask=mask, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                    pad_token_id=0, use_cache=True)
    with torch.no_grad():
        model.generate(ids[:2], **dict(settings, attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4))
        start = time.perf_counter()
        out = model.generate(ids, **settings)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": int((out.shape[1] - width) * len(prompts))}))


if __name__ == "__main__":
    main()
