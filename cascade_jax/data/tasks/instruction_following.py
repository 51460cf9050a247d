"""Instruction-following prompts with checkable constraints (IFEval style) and their checkers."""

from __future__ import annotations

import json
import random
import re

from cascade_jax.data.tasks.answers import final_answer

KIND = "ifeval"
TOPICS = ("rivers", "bicycles", "tea", "volcanoes", "libraries", "owls", "bridges", "gardens",
          "comets", "bread", "chess", "lighthouses", "maps", "glaciers", "violins", "bees")
_FACTS = ("are worth learning about", "have a long history", "change with the seasons",
          "appear in many stories", "can be surprisingly complex", "inspire careful study",
          "connect people and places", "reward patient observation")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check(constraint: dict, answer: str) -> bool:
    """Whether ``answer`` satisfies one constraint."""
    t = constraint["type"]
    if t == "min_words":
        return len(_words(answer)) >= constraint["n"]
    if t == "max_words":
        return len(_words(answer)) <= constraint["n"]
    if t == "include_keyword":
        return re.search(r"\b" + re.escape(constraint["word"]) + r"\b", answer, re.IGNORECASE) is not None
    if t == "exclude_keyword":
        return re.search(r"\b" + re.escape(constraint["word"]) + r"\b", answer, re.IGNORECASE) is None
    if t == "lowercase":
        return answer == answer.lower() and any(c.isalpha() for c in answer)
    if t == "uppercase":
        return answer == answer.upper() and any(c.isalpha() for c in answer)
    if t == "bullets":
        return len([ln for ln in answer.splitlines() if ln.startswith("- ")]) == constraint["n"]
    if t == "end_with":
        return answer.rstrip().endswith(constraint["phrase"])
    if t == "start_with":
        return answer.lstrip().startswith(constraint["phrase"])
    if t == "json":
        try:
            json.loads(answer.strip().removeprefix("```json").removesuffix("```"))
        except ValueError:
            return False
        return True
    raise ValueError(f"unknown constraint type {t!r}")


def describe(c: dict) -> str:
    return {
        "min_words": lambda: f"Use at least {c.get('n')} words.",
        "max_words": lambda: f"Use at most {c.get('n')} words.",
        "include_keyword": lambda: f"Include the word \"{c.get('word')}\".",
        "exclude_keyword": lambda: f"Do not use the word \"{c.get('word')}\".",
        "lowercase": lambda: "Write everything in lowercase letters.",
        "uppercase": lambda: "Write everything in capital letters.",
        "bullets": lambda: f"Answer with exactly {c.get('n')} bullet points starting with \"- \".",
        "end_with": lambda: f"End your answer with the phrase \"{c.get('phrase')}\".",
        "start_with": lambda: f"Start your answer with \"{c.get('phrase')}\".",
        "json": lambda: "Answer with a single valid JSON object.",
    }[c["type"]]()


def generate(rng: random.Random) -> dict:
    """A prompt with 1-3 compatible constraints and a response that satisfies all of them."""
    topic = rng.choice(TOPICS)
    other = rng.choice([t for t in TOPICS if t != topic])
    case = rng.choice(["lowercase", "uppercase", None])
    shape = rng.choice(["bullets", "json", "prose"])
    n = rng.randint(2, 4)
    facts = rng.sample(_FACTS, n)
    sentences = [f"{topic.capitalize()} {f}." for f in facts]
    constraints: list[dict] = []
    if shape == "bullets":
        constraints.append({"type": "bullets", "n": n})
        body = "\n".join("- " + s for s in sentences)
    elif shape == "json":
        constraints.append({"type": "json"})
        body = json.dumps({"topic": topic, "points": sentences})
        case = None
    else:
        body = " ".join(sentences)
        if rng.random() < 0.5:
            constraints.append({"type": "end_with", "phrase": "That is all."})
            body += " That is all."
    if case == "lowercase":
        body = body.lower()
    elif case == "uppercase":
        body = body.upper()
    if case:
        for c in constraints:
            if "phrase" in c:
                c["phrase"] = c["phrase"].lower() if case == "lowercase" else c["phrase"].upper()
        constraints.append({"type": case})
    constraints.append({"type": "exclude_keyword", "word": other})
    words = len(_words(body))
    constraints.append(rng.choice([{"type": "min_words", "n": max(1, words - rng.randint(0, 5))},
                                   {"type": "max_words", "n": words + rng.randint(0, 10)}]))
    prompt = f"Write a short note about {topic}. " + " ".join(describe(c) for c in constraints)
    reasoning = "Constraints to satisfy: " + "; ".join(c["type"] for c in constraints) + ". I draft the note and check each one."
    assert all(check(c, body) for c in constraints), (constraints, body)
    return {"prompt": prompt, "reasoning": reasoning, "response": body,
            "verifier": {"kind": KIND, "constraints": constraints}}


def verify(response: str, spec: dict) -> float:
    """Fraction of constraints the final answer satisfies (1.0 = all, the strict IFEval score)."""
    answer = final_answer(response)
    constraints = spec["constraints"]
    return sum(check(c, answer) for c in constraints) / max(1, len(constraints))
