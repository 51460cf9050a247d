"""Code reward: the last fenced python block of the final answer, run against the verifier's unit tests.

The program runs in ``cascade_jax.rl.sandbox`` (resource limits, isolation), imported when first needed so
that the other rewards work without it. The verifier's ``timeout_s`` bounds both the wall and the CPU time.
"""

from __future__ import annotations

from cascade_jax.data.tasks.python_functions import extract_code

DEFAULT_TIMEOUT_S = 10.0


def python_tests_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """The sandbox's score of the extracted program on ``verifier["tests"]``; 0.0 when there is no python block."""
    verifier = metadata["verifier"]
    tests = list(verifier["tests"])
    if not tests:
        raise ValueError("python_tests verifier has no tests")
    code = extract_code(response)
    if code is None:
        return 0.0, {"reason": "no fenced python block after </think>"}
    from cascade_jax.rl.sandbox import SandboxLimits, code_reward

    timeout_s = float(verifier.get("timeout_s", DEFAULT_TIMEOUT_S))
    limits = SandboxLimits(wall_seconds=timeout_s, cpu_seconds=timeout_s)
    reward, details = code_reward(code, tests, limits=limits)
    return float(reward), dict(details)
