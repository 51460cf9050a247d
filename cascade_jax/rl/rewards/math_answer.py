"""Math rewards: the last ``\\boxed{}`` after ``</think>`` against the reference answer.

``boxed_number`` (the tiny arithmetic task) compares exact numbers. ``math`` asks math-verify whether the
two are the same mathematical object (``\\frac{1}{2}`` = ``0.5``, ``2\\sqrt{2}`` = ``\\sqrt{8}``) and falls
back to the exact numeric comparison when math-verify cannot parse or compare them.

math-verify bounds its own parsing and comparison with ``signal.alarm``, which only works in a process's
main thread; elsewhere (a thread pool, a server handler) the bound is switched off and the caller must
bound the time itself. The ``RewardPool`` runs rewards in worker processes' main threads, so it works there.
"""

from __future__ import annotations

import math
import threading
import time

from cascade_jax.data.tasks import arithmetic
from cascade_jax.data.tasks.answers import final_answer, last_boxed, parse_number

DEFAULT_TIMEOUT_S = 5.0
_SHOWN = 200  # characters of the extracted answer kept in details


def boxed_number_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """1.0 if the last ``\\boxed{}`` after ``</think>`` equals ``verifier["answer"]`` exactly as a number."""
    verifier = metadata["verifier"]
    boxed = last_boxed(final_answer(response))
    if boxed is None:
        return 0.0, {"extracted": None, "reason": "no \\boxed{} after </think>"}
    reward = arithmetic.verify(response, verifier)
    return reward, {"extracted": boxed[:_SHOWN], "reason": "equal" if reward else "not equal"}


def _alarm_seconds(verifier: dict) -> int | None:
    """math-verify's timeout (whole seconds, as signal.alarm takes), or None where the alarm cannot work."""
    if threading.current_thread() is not threading.main_thread():
        return None
    # alarm(0) would mean "no alarm", so round up and keep at least one second.
    return max(1, math.ceil(float(verifier.get("timeout_s", DEFAULT_TIMEOUT_S))))


def _math_verify_equal(answer: str, boxed: str, timeout: int | None) -> bool:
    from math_verify import parse, verify  # sympy + antlr: imported on first use, not with the package

    gold_text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    # Gold first: math-verify's comparison is not symmetric (the reference decides what counts as equal).
    return bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """1.0 if the last ``\\boxed{}`` after ``</think>`` is ``verifier["answer"]`` (math-verify, then exact numbers)."""
    verifier = metadata["verifier"]
    answer = str(verifier["answer"])
    boxed = last_boxed(final_answer(response))
    if boxed is None:
        return 0.0, {"extracted": None, "reason": "no \\boxed{} after </think>"}
    start = time.perf_counter()
    if _math_verify_equal(answer, boxed, _alarm_seconds(verifier)):
        return 1.0, {"extracted": boxed[:_SHOWN], "reason": "math_verify equal"}
    got, want = parse_number(boxed), parse_number(answer)
    if got is not None and want is not None and got == want:
        return 1.0, {"extracted": boxed[:_SHOWN], "reason": "numbers equal"}
    # A math-verify timeout also lands here (it returns False); the time spent tells the two apart.
    return 0.0, {"extracted": boxed[:_SHOWN], "reason": "not equal",
                 "verify_s": round(time.perf_counter() - start, 3)}
