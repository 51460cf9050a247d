"""Cached greedy generation equals transformers' greedy `generate`, token for token, on the HF fixtures.

`tests/fixtures/hf/<name>/greedy.json` (made by tests/reference/make_generate_fixtures.py with transformers
5.23.0, float32, Δ clamped to the config's time_step_limit like cascade_jax) holds prompts and the 16 tokens
transformers' `generate(do_sample=False, eos_token_id=None)` continues each with; its cached and uncached runs
agreed on every stored prompt. Here all of a fixture's prompts go through `cascade_jax.inference.generate` at
once (T = 0, no stop tokens), so the slot pool, the bucketed left-padded prefill and the decode scan are all
on the path.

Near-ties: a step whose top-2 logit margin (transformers' cached run, `top2_margins`) is below NEAR_TIE may
flip under a different float32 summation order, and every later token depends on it; the comparison of that
prompt ends before such a step. On a mismatch the failure message says whether cascade_jax's own uncached
greedy (the full forward re-run per step) agrees with transformers or with the cached run, at which step, and
the top-2 margins there.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import cascade_jax as cj
from cascade_jax.inference import SamplingParams, generate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/greedy.json"))
NEAR_TIE = 1e-4


def compared_steps(margins: list[float]) -> int:
    """Steps compared: all up to (not including) the first near-tie."""
    return next((s for s, m in enumerate(margins) if m < NEAR_TIE), len(margins))


def _top2(logits) -> tuple[int, float]:
    logits = np.asarray(logits, np.float64)
    first, second = np.argsort(-logits, kind="stable")[:2]
    return int(first), float(logits[first] - logits[second])


def _uncached_greedy(model, prompt, steps):
    """cascade_jax greedy by the full forward over the whole sequence at every step: (tokens, margins)."""
    ids, tokens, margins = list(prompt), [], []
    for _ in range(steps):
        token, margin = _top2(model(np.asarray([ids], np.int32)).logits[0, -1])
        tokens.append(token)
        margins.append(margin)
        ids.append(token)
    return tokens, margins


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _diagnose(model, prompt, expected, got, hf_margins):
    n = len(expected)
    full, full_margins = _uncached_greedy(model, prompt, n)
    step = _first_difference(expected, got)
    lines = [f"prompt {prompt}: cached generate differs from transformers at step {step} "
             f"(transformers {expected[step]}, cascade_jax {got[step]}; transformers' top-2 margin there "
             f"{hf_margins[step]:.3e})"]
    full_vs_hf = _first_difference(expected, full)
    if full_vs_hf is None:
        lines.append("cascade_jax's uncached greedy (full forward per step) equals transformers: the cache "
                     "path is what differs")
    else:
        lines.append(f"cascade_jax's uncached greedy also differs from transformers, first at step {full_vs_hf} "
                     f"(its top-2 margin {full_margins[full_vs_hf]:.3e}, transformers' "
                     f"{hf_margins[full_vs_hf]:.3e}): the model itself differs")
    full_vs_cached = _first_difference(full, got)
    lines.append("cascade_jax cached == uncached" if full_vs_cached is None
                 else f"cascade_jax cached vs uncached first differ at step {full_vs_cached}")
    return "; ".join(lines)


@pytest.mark.parametrize("name", NAMES)
def test_cached_greedy_equals_transformers_generate(name):
    record = json.loads((FIXTURES / name / "greedy.json").read_text())
    prompts, expected = record["prompts"], record["continuations"]
    assert prompts and len(prompts) == len(expected) == len(record["top2_margins"])
    model = cj.load_pretrained(FIXTURES / name)
    completions = generate(model, prompts, SamplingParams(max_new_tokens=record["max_new_tokens"], temperature=0.0))
    assert [c.prompt_index for c in completions] == list(range(len(prompts)))
    failures = []
    for prompt, want, margins, completion in zip(prompts, expected, record["top2_margins"], completions):
        assert completion.finish_reason == "length" and len(completion.tokens) == record["max_new_tokens"]
        n = compared_steps(margins)
        assert n >= 4, f"{name}: prompt {prompt} has a near-tie at step {n}; pick another prompt"
        if completion.tokens[:n] != want[:n]:
            failures.append(_diagnose(model, prompt, want[:n], completion.tokens[:n], margins))
    assert not failures, f"{name}:\n" + "\n".join(failures)


def test_every_fixture_has_a_greedy_reference():
    assert NAMES == ["dense_attn_mamba", "grouped_routing", "mamba_moe_attn", "small_dt"]
