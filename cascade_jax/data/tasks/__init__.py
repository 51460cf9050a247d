"""Procedurally generated, verifiable tasks (for the tiny demo) and their verifiers (reused as RL rewards).

Each task module has ``KIND``, ``generate(rng) -> {prompt, reasoning, response, verifier}`` and
``verify(response, verifier_spec) -> float in [0, 1]``. ``verify`` dispatches on ``spec["kind"]``.
"""

from __future__ import annotations

from cascade_jax.data.tasks import arithmetic, instruction_following, multiple_choice, python_functions

TASKS = {
    "math": arithmetic,
    "instruction_following": instruction_following,
    "multiple_choice": multiple_choice,
    "code": python_functions,
}
VERIFIERS = {m.KIND: m.verify for m in TASKS.values()}


def verify(response: str, spec: dict) -> float:
    """Reward of ``response`` under a verifier spec such as ``{"kind": "boxed_number", "answer": "42"}``."""
    try:
        fn = VERIFIERS[spec["kind"]]
    except KeyError:
        raise ValueError(f"unknown verifier kind {spec.get('kind')!r}; known: {sorted(VERIFIERS)}") from None
    return fn(response, spec)


__all__ = ["TASKS", "VERIFIERS", "verify", "arithmetic", "instruction_following", "multiple_choice",
           "python_functions"]
