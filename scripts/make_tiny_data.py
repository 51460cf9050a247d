"""Generates the bundled tiny-demo data: SFT conversations, RL prompts and held-out eval sets.

Files: ``sft.jsonl`` (training chats), ``sft_eval.jsonl`` (held-out chats, for eval loss),
``rl.jsonl`` (RL prompts with verifier specs), ``eval.jsonl`` (held-out prompts with verifier specs), and
their per-domain subsets ``rl_<domain>.jsonl`` / ``eval_<domain>.jsonl`` (math, if, mcq, code: the tiny
cascade stages' prompts and held-out sets).

    python scripts/make_tiny_data.py [--out cascade_jax/data/assets/tiny] [--seed 0]

Every sample comes from a procedural task in ``cascade_jax.data.tasks`` (arithmetic with a thinking
trace and a ``\\boxed{}`` answer, instruction-following constraints, multiple choice, small Python
functions with unit tests), so every RL / eval prompt carries a verifier spec that really checks
answers. SFT mixes thinking and non-thinking turns, multi-turn history and calculator tool calls.
Prompts are deduplicated across the three splits (eval never overlaps SFT or RL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cascade_jax.data.tasks import TASKS  # noqa: E402

DOMAINS = list(TASKS)
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluates an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "The expression, e.g. (3 + 4) * 2"}},
        "required": ["expression"]}}}
SYSTEMS = ("You are a helpful assistant.", "You are a careful tutor. Explain briefly.", "")


def _assistant(task: dict, thinking: bool) -> dict:
    msg = {"role": "assistant", "content": task["response"]}
    if thinking:
        msg["reasoning_content"] = task["reasoning"]
    return msg


def sft_sample(rng: random.Random, seen: set[str]) -> dict:
    domain = rng.choice(DOMAINS)
    task = _fresh(rng, domain, seen)
    thinking = rng.random() < 0.7
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    sample: dict = {"domain": domain, "source": f"tiny-{domain}", "thinking": thinking}
    if domain == "math" and rng.random() < 0.25:  # tool-calling trajectory
        expr = task["prompt"].removeprefix("Compute ").split(". Put")[0]
        value = task["verifier"]["answer"]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}]}
        if thinking:
            call["reasoning_content"] = "I will check the arithmetic with the calculator tool."
        messages += [{"role": "user", "content": task["prompt"]}, call,
                     {"role": "tool", "content": value}, _assistant(task, thinking)]
        sample["tools"] = [CALCULATOR]
        sample["domain"] = "tool_calling"
    else:
        if rng.random() < 0.2:  # one earlier exchange: history keeps only its final answer
            prev = _fresh(rng, rng.choice(DOMAINS), seen)
            messages += [{"role": "user", "content": prev["prompt"]}, _assistant(prev, thinking)]
        messages += [{"role": "user", "content": task["prompt"]}, _assistant(task, thinking)]
    sample["messages"] = messages
    return sample


def _fresh(rng: random.Random, domain: str, seen: set[str]) -> dict:
    for _ in range(1000):
        task = TASKS[domain].generate(rng)
        if task["prompt"] not in seen:
            seen.add(task["prompt"])
            return task
    raise RuntimeError(f"could not find a new {domain} prompt")


def prompt_sample(rng: random.Random, seen: set[str]) -> dict:
    domain = rng.choice(DOMAINS)
    task = _fresh(rng, domain, seen)
    return {"messages": [{"role": "user", "content": task["prompt"]}], "domain": domain,
            "source": f"tiny-{domain}", "verifier": task["verifier"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.join(os.path.dirname(__file__), "..", "cascade_jax", "data", "assets", "tiny")
    ap.add_argument("--out", default=os.path.normpath(here))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft", type=int, default=3000)
    ap.add_argument("--rl", type=int, default=600)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--sft-eval", type=int, default=200)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng, seen = random.Random(args.seed), set()
    splits = {"eval": [prompt_sample(rng, seen) for _ in range(args.eval)],
              "rl": [prompt_sample(rng, seen) for _ in range(args.rl)],
              "sft": [sft_sample(rng, seen) for _ in range(args.sft)]}
    splits["sft_eval"] = [sft_sample(rng, seen) for _ in range(args.sft_eval)]  # held-out eval loss
    for name in ("rl", "eval"):
        for domain, short in (("math", "math"), ("instruction_following", "if"), ("multiple_choice", "mcq"),
                              ("code", "code")):
            splits[f"{name}_{short}"] = [row for row in splits[name] if row["domain"] == domain]
    for name, rows in splits.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(rows)} samples, {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
