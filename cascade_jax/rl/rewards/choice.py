"""Multiple-choice reward: the boxed (or stated ``Answer: X``) letter after ``</think>`` vs the reference letter.

The data task's ``extract_letter`` knows four options (A-D); RL sets such as MMLU-Pro have up to ten, so the
letter here is any capital, and ``\\boxed{\\text{C}}`` / ``\\boxed{(C)}`` count as ``C``.
"""

from __future__ import annotations

import re

from cascade_jax.data.tasks.answers import final_answer, last_boxed

_BOXED = re.compile(r"\(?(?:\\text(?:bf)?\{)?\s*([A-Z])\s*\}?\)?\.?")
_STATED = re.compile(r"[Aa]nswer\s*(?:is|:)?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_choice(response: str) -> str | None:
    """The chosen letter: from the last ``\\boxed{}`` of the final answer, else from its last ``Answer: X``."""
    answer = final_answer(response)
    boxed = last_boxed(answer)
    if boxed is not None:
        m = _BOXED.fullmatch(boxed.strip())
        return m.group(1) if m else None
    found = _STATED.findall(answer)
    return found[-1] if found else None


def mcq_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """1.0 if the chosen letter equals ``verifier["answer"]`` (the reference's case is ignored)."""
    want = str(metadata["verifier"]["answer"]).strip().upper()
    got = extract_choice(response)
    if got is None:
        return 0.0, {"extracted": None, "reason": "no letter in \\boxed{} or 'Answer: X' after </think>"}
    return float(got == want), {"extracted": got, "reason": "match" if got == want else f"expected {want}"}
