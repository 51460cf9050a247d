#!/usr/bin/env python
"""Greedy-generation reference for the HF fixtures: what transformers' `generate` produces, token for token.

Run with the reference Python (`bash scripts/setup_reference.sh` makes it; see tests/reference/README.md):

    .venv-ref/bin/python tests/reference/make_generate_fixtures.py [--only NAME ...] [--check-only]

For each fixture directory `tests/fixtures/hf/<name>/` (made by make_fixtures.py, left untouched) it loads the
model with `AutoModelForCausalLM` in float32, eval mode, and sets every Mamba mixer's `time_step_limit` to the
config's (all fixtures: (0, inf), i.e. no Δ clamp). transformers 5.23.0 ignores `config.time_step_limit` and
clamps Δ at `time_step_min` in the chunked (prefill / no-cache) path only, never in the one-token decode path;
cascade_jax applies the config's limit everywhere, so the patch is what makes both sides compute the same thing.

Prompts: `numpy.random.default_rng(SEED + index of the fixture)` token ids in [1, vocab), lengths 1, 3, 8, 17,
each run on its own (batch 1, no padding). Every prompt is generated twice, greedy, 16 new tokens, no EOS
(`eos_token_id=None`, so nothing stops early), `pad_token_id=0`: with `use_cache=True` and `use_cache=False`.
When transformers' own two runs disagree the prompt is left out (printed, and listed under `"dropped"`).

Writes `tests/fixtures/hf/<name>/greedy.json`:
`{"max_new_tokens", "prompts", "continuations", "top2_margins", "dropped", "transformers", "torch"}` where
`top2_margins[i][s]` is the cached run's logit gap between its best and second-best token at step s (how close
that step is to a tie; float32 summation order can flip a tie).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hf"
NAMES = ("dense_attn_mamba", "grouped_routing", "mamba_moe_attn", "small_dt")
SEED = 2024
PROMPT_LENGTHS = (1, 3, 8, 17)   # all in one prefill bucket (16 wide): one compilation per fixture in the test
MAX_NEW_TOKENS = 16


def load(directory: Path) -> NemotronHForCausalLM:
    """float32 eval model; Mamba mixers clamp Δ to the config's time_step_limit (like cascade_jax); no EOS in
    its generation_config (generate fills fields left unset from it, and min_new_tokens would suppress EOS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True,
                                                           trust_remote_code=False)
    assert type(model) is NemotronHForCausalLM, type(model)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    limit = tuple(float(v) for v in model.config.time_step_limit)
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = limit
    model.generation_config.eos_token_id = None
    return model.eval()


def prompts_for(index: int, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(SEED + index)
    return [rng.integers(1, vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def greedy(model: NemotronHForCausalLM, prompt: list[int], use_cache: bool) -> tuple[list[int], list[float]]:
    """(the 16 new tokens, the top-2 logit margin at each step)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                              use_cache=use_cache, return_dict_in_generate=True, output_logits=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out.sequences[0, len(prompt):].tolist()
    assert len(new) == MAX_NEW_TOKENS, f"stopped early: {new}"
    margins = []
    for token, step_logits in zip(new, out.logits, strict=True):
        top2 = step_logits[0].float().topk(2)
        # plain argmax: no logits processor (e.g. one suppressing an EOS token) changed the choice
        assert token == int(top2.indices[0]), (token, top2)
        margins.append(float(top2.values[0] - top2.values[1]))
    return new, margins


def build_one(index: int, name: str, write: bool) -> None:
    directory = FIXTURES / name
    model = load(directory)
    kept, continuations, margins, dropped = [], [], [], []
    for prompt in prompts_for(index, model.config.vocab_size):
        cached, m = greedy(model, prompt, use_cache=True)
        uncached, _ = greedy(model, prompt, use_cache=False)
        if cached != uncached:
            step = next(i for i, (a, b) in enumerate(zip(cached, uncached)) if a != b)
            print(f"   {name}: prompt of {len(prompt)} tokens DROPPED: transformers' cached and uncached greedy "
                  f"differ at step {step} (cached margin there {m[step]:.2e})")
            dropped.append({"prompt": prompt, "cached": cached, "uncached": uncached, "first_difference": step})
            continue
        kept.append(prompt)
        continuations.append(cached)
        margins.append([round(v, 6) for v in m])
        print(f"   {name}: prompt of {len(prompt):2d} tokens: cached == uncached; min top-2 margin {min(m):.2e}")
    record = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": kept,
        "continuations": continuations,
        "top2_margins": margins,
        "dropped": dropped,
        "prompt_seed": SEED + index,
        "time_step_limit": [float(v) if np.isfinite(v) else str(float(v)) for v in model.config.time_step_limit],
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    if write:
        body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items())   # one key a line
        (directory / "greedy.json").write_text("{\n" + body + "\n}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=NAMES, help="subset of fixtures")
    parser.add_argument("--check-only", action="store_true", help="generate and print, write nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for index, name in enumerate(NAMES):
        if args.only and name not in args.only:
            continue
        print(f"== {name}")
        build_one(index, name, write=not args.check_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
