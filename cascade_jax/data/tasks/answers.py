"""Pulling final answers out of model responses: the text after ``</think>``, ``\\boxed{…}``, numbers."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def final_answer(response: str) -> str:
    """The part of a response after its reasoning (the text after the last ``</think>``)."""
    return response.rsplit("</think>", 1)[-1].strip()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def parse_number(text: str) -> Fraction | None:
    """An exact number from ``12``, ``-3.5``, ``7/4``, ``1,234`` or ``\\frac{7}{4}``; None if it is not one."""
    t = text.strip().replace(",", "").replace(" ", "").strip("$")
    m = re.fullmatch(r"-?\\frac\{(-?\d+)\}\{(\d+)\}", t)
    if m:
        sign = -1 if t.startswith("-") else 1
        return sign * Fraction(int(m.group(1)), int(m.group(2)))
    if not _NUMBER.match(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
