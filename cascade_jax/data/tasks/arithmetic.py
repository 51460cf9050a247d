"""Arithmetic word-free problems with a step-by-step thinking trace and a ``\\boxed{}`` answer."""

from __future__ import annotations

import random
from fractions import Fraction

from cascade_jax.data.tasks.answers import final_answer, last_boxed, parse_number

KIND = "boxed_number"
_OPS = ("+", "-", "*")


def _expr(rng: random.Random, depth: int) -> tuple[str, int, list[str]]:
    """Returns (expression text, value, evaluation steps) for a random expression tree."""
    if depth == 0:
        v = rng.randint(1, 30)
        return str(v), v, []
    op = rng.choice(_OPS)
    ls, lv, lsteps = _expr(rng, depth - 1)
    rs, rv, rsteps = _expr(rng, rng.randint(0, depth - 1))
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    lt = f"({ls})" if not ls.lstrip("-").isdigit() else ls
    rt = f"({rs})" if not rs.lstrip("-").isdigit() else rs
    steps = lsteps + rsteps + [f"{lv} {op} {rv} = {value}"]
    return f"{lt} {op} {rt}", value, steps


def generate(rng: random.Random) -> dict:
    """One problem: prompt, reasoning trace, final response and the verifier spec."""
    text, value, steps = _expr(rng, rng.randint(1, 3))
    prompt = f"Compute {text}. Put the final answer in \\boxed{{}}."
    reasoning = "I evaluate the innermost operations first.\n" + "\n".join(steps) + f"\nSo the result is {value}."
    response = f"The value of {text} is \\boxed{{{value}}}."
    return {"prompt": prompt, "reasoning": reasoning, "response": response,
            "verifier": {"kind": KIND, "answer": str(value)}}


def verify(response: str, spec: dict) -> float:
    """1.0 if the last ``\\boxed{}`` of the final answer equals ``spec['answer']`` exactly as a number."""
    boxed = last_boxed(final_answer(response))
    if boxed is None:
        return 0.0
    got, want = parse_number(boxed), parse_number(str(spec["answer"]))
    if got is None or want is None:
        return float(boxed.strip() == str(spec["answer"]).strip())
    return float(Fraction(got) == Fraction(want))
