"""Instruction-following reward (IFEval style): checkable constraints on the final answer.

The constraint types that ``data/tasks/instruction_following.check`` knows (word counts, keywords, case,
bullets, start/end phrases, JSON) are delegated to it; the IFEval families below are checked here, following
the IFEval reference checkers (``google-research/instruction_following_eval``) where a rule is not obvious:
sections, highlights and placeholders count "at least n"; paragraphs are separated by ``***``.

Score: strict by default (1.0 only when every constraint holds, the IFEval "strict prompt" accuracy);
``verifier["mode"] == "fraction"`` gives the fraction of constraints that hold. An unknown constraint type
or relation raises ValueError (a data mistake; the pool turns it into reward 0 and counts it).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

from cascade_jax.data.tasks import instruction_following
from cascade_jax.data.tasks.answers import final_answer

# Types handled by instruction_following.check (listed only for the unknown-type message).
_DELEGATED = ("bullets", "end_with", "exclude_keyword", "include_keyword", "json", "lowercase", "max_words",
              "min_words", "start_with", "uppercase")
_RELATIONS = {"at least": operator.ge, "less than": operator.lt, "at most": operator.le, "exactly": operator.eq,
              "more than": operator.gt}


def _related(c: dict, count: int, default: str = "at least") -> bool:
    relation = c.get("relation", default)
    if relation not in _RELATIONS:
        raise ValueError(f"ifeval {c['type']}: unknown relation {relation!r}; known: {sorted(_RELATIONS)}")
    return _RELATIONS[relation](count, int(c["n"]))


def _word_count(word: str, text: str) -> int:
    return len(re.findall(r"\b" + re.escape(word) + r"\b", text, re.IGNORECASE))


def _paragraphs(c: dict, text: str) -> bool:
    # IFEval: empty pieces are allowed only at the ends (a leading or trailing ***).
    parts = re.split(r"\s?\*\*\*\s?", text)
    inner_empty = any(not p.strip() for p in parts[1:-1])
    count = sum(1 for p in parts if p.strip())
    return not inner_empty and count == int(c["n"])


def _sections(c: dict, text: str) -> bool:
    splitter = c.get("splitter", "Section")
    return len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", text)) - 1 >= int(c["n"])


def _highlights(c: dict, text: str) -> bool:
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h.strip("*").strip()]
    return len(single) + len(double) >= int(c["n"])


def _postscript(c: dict, text: str) -> bool:
    marker = c.get("marker", "P.S.")
    # "P.S." also matches "P. S." / "p.s.": dots may be followed by a space, case is ignored.
    pattern = r"\.\s?".join(re.escape(part) for part in marker.split("."))
    return re.search(r"^\s*" + pattern, text, re.IGNORECASE | re.MULTILINE) is not None


def _sentences(text: str) -> int:
    # A sentence ends at . ! or ? followed by whitespace or the end (abbreviations are not special-cased).
    return sum(1 for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s))


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


CHECKERS: dict[str, Callable[[dict, str], bool]] = {
    "keyword_frequency": lambda c, t: _related(c, _word_count(c["word"], t)),
    "forbidden_words": lambda c, t: not any(_word_count(w, t) for w in c["words"]),
    "letter_frequency": lambda c, t: _related(c, t.lower().count(str(c["letter"]).lower())),
    "paragraphs": _paragraphs,
    "sections": _sections,
    "highlights": _highlights,
    "title": lambda c, t: any(m.strip() for m in re.findall(r"<<([^\n]+)>>", t)),
    "postscript": _postscript,
    "placeholders": lambda c, t: len(re.findall(r"\[.*?\]", t)) >= int(c["n"]),
    "no_comma": lambda c, t: "," not in t,
    "quotation": lambda c, t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "min_sentences": lambda c, t: _sentences(t) >= int(c["n"]),
    "max_sentences": lambda c, t: _sentences(t) <= int(c["n"]),
    "capital_words": lambda c, t: _related(c, sum(1 for w in _words(t) if w.isupper())),
    "two_responses": lambda c, t: _two_responses(t),
    "repeat_prompt": lambda c, t: t.strip().lower().startswith(str(c["text"]).strip().lower()),
}
KNOWN_TYPES = tuple(sorted(set(CHECKERS) | set(_DELEGATED)))


def check(constraint: dict, answer: str) -> bool:
    """Whether ``answer`` satisfies one constraint; ValueError (one line) for an unknown or incomplete one."""
    t = constraint.get("type")
    try:
        if t in CHECKERS:
            return bool(CHECKERS[t](constraint, answer))
        if t in _DELEGATED:
            return bool(instruction_following.check(constraint, answer))
    except KeyError as e:
        raise ValueError(f"ifeval constraint {t!r} lacks field {e.args[0]!r}") from None
    raise ValueError(f"unknown ifeval constraint type {t!r}; known: {', '.join(KNOWN_TYPES)}")


def ifeval_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """All constraints hold → 1.0 (strict, default); ``mode="fraction"`` → the fraction that hold."""
    verifier = metadata["verifier"]
    constraints = verifier["constraints"]
    mode = verifier.get("mode", "strict")
    if mode not in ("strict", "fraction"):
        raise ValueError(f"ifeval verifier: unknown mode {mode!r}; known: strict, fraction")
    if not constraints:
        raise ValueError("ifeval verifier has no constraints")
    answer = final_answer(response)
    results = [check(c, answer) for c in constraints]
    failed = [c["type"] for c, ok in zip(constraints, results) if not ok]
    score = sum(results) / len(results) if mode == "fraction" else float(all(results))
    return score, {"passed": len(results) - len(failed), "total": len(results), "failed": failed,
                   "reason": "all constraints hold" if not failed else "failed: " + ", ".join(failed)}
