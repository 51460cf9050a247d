"""Verifiable rewards for GRPO: ``reward(response, metadata) -> (reward in [0, 1], details)``.

``metadata`` is an RL prompt record's metadata: ``{"verifier": {"kind": ..., ...}, "domain": ..., ...}``;
``details`` is a small JSON-friendly dict (``extracted``, ``reason``, …) for logs. Every reward reads the
final answer, the text after the last ``</think>``, so an answer that appears only in the reasoning
does not count. A reward raises ValueError (one line) for a malformed verifier; ``RewardPool``
(``rewards/pool.py``) turns raised errors, hangs and crashed workers into reward 0 and counts them, so
nothing a reward does stops the run.

Verifier kinds (``REWARDS``):
    boxed_number  exact number in the last \\boxed{}             {"answer"}
    math          math-verify equivalence, then exact numbers    {"answer", "timeout_s"?}
    mcq           chosen letter                                  {"answer"}
    json_schema   JSON validated by jsonschema                   {"schema"}
    tool_call     <tool_call> blocks vs reference calls          {"calls", "ordered"?}
    ifeval        instruction constraints, strict or fraction    {"constraints", "mode"?}
    python_tests  unit tests in the sandbox                      {"tests", "timeout_s"?}
"""

from __future__ import annotations

from collections.abc import Callable

from cascade_jax.data.chat_template import IM_END, PAD
from cascade_jax.rl.rewards.choice import mcq_reward
from cascade_jax.rl.rewards.code import python_tests_reward
from cascade_jax.rl.rewards.instruction import ifeval_reward
from cascade_jax.rl.rewards.math_answer import boxed_number_reward, math_reward
from cascade_jax.rl.rewards.structured import json_schema_reward
from cascade_jax.rl.rewards.tool_call import tool_call_reward

Reward = Callable[[str, dict], tuple[float, dict]]

# Rule-based rewards, CPU bound: these run in RewardPool's worker processes, which look them up here by kind.
# Rewards that wait on I/O (the LLM judge, rewards/judge.py) are NOT registered here: they are batched over
# HTTP by their own client and never go through the pool.
REWARDS: dict[str, Reward] = {
    "boxed_number": boxed_number_reward,
    "math": math_reward,
    "mcq": mcq_reward,
    "json_schema": json_schema_reward,
    "tool_call": tool_call_reward,
    "ifeval": ifeval_reward,
    "python_tests": python_tests_reward,
}


def strip_end_tokens(response: str) -> str:
    """``response`` without the trailing ``<|im_end|>`` / ``<pad>`` a rollout decoded with its special tokens ends in.

    Rollouts must be decoded with special tokens kept: ``</think>`` and ``<tool_call>`` are special tokens, and
    without them the reasoning would count as the answer. The end-of-turn token then trails the answer, where
    it would break "valid JSON" or "ends with …" checks.
    """
    text = response
    while text.rstrip().endswith((IM_END, PAD)):
        text = text.rstrip().removesuffix(IM_END).removesuffix(PAD)
    return text


def compute_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """The reward of ``response`` (end tokens stripped) under ``metadata["verifier"]``, dispatched on its kind."""
    verifier = metadata.get("verifier") if isinstance(metadata, dict) else None
    if not isinstance(verifier, dict):
        raise ValueError("reward metadata has no 'verifier' object")
    kind = verifier.get("kind")
    if kind not in REWARDS:
        raise ValueError(f"unknown verifier kind {kind!r}; known: {', '.join(sorted(REWARDS))}")
    reward, details = REWARDS[kind](strip_end_tokens(response), metadata)
    return float(reward), details


__all__ = ["REWARDS", "Reward", "compute_reward", "strip_end_tokens"]
