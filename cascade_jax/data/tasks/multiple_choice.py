"""Multiple-choice questions (four options, one correct letter) and the letter checker."""

from __future__ import annotations

import random
import re

from cascade_jax.data.tasks.answers import final_answer, last_boxed

KIND = "mcq"
LETTERS = "ABCD"


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _question(rng: random.Random) -> tuple[str, str, list[str], str]:
    """(question, correct option, distractors, explanation)."""
    kind = rng.randrange(4)
    if kind == 0:
        primes = [n for n in range(10, 100) if _is_prime(n)]
        comps = [n for n in range(10, 100) if not _is_prime(n)]
        p = rng.choice(primes)
        return ("Which of these numbers is prime?", str(p), [str(c) for c in rng.sample(comps, 3)],
                f"{p} has no divisor between 2 and its square root; the others are composite.")
    if kind == 1:
        nums = rng.sample(range(100, 1000), 4)
        big = max(nums)
        return ("Which number is the largest?", str(big), [str(n) for n in nums if n != big],
                f"Comparing digit by digit, {big} is the largest.")
    if kind == 2:
        km = rng.randint(2, 40)
        return (f"How many meters are in {km} kilometers?", str(km * 1000),
                [str(km * 100), str(km * 10), str(km * 10000)], f"One kilometer is 1000 meters, so {km} km = {km * 1000} m.")
    word = rng.choice(["planet", "garden", "silver", "window", "orange", "castle", "rocket"])
    wrong = {word[::-1]}
    while len(wrong) < 4:
        w = list(word)
        rng.shuffle(w)
        wrong.add("".join(w))
    wrong.discard(word[::-1])
    return (f"What is the word \"{word}\" spelled backwards?", word[::-1], sorted(wrong)[:3],
            f"Reading {word} from the last letter to the first gives {word[::-1]}.")


def generate(rng: random.Random) -> dict:
    question, right, wrong, why = _question(rng)
    options = wrong[:3] + [right]
    rng.shuffle(options)
    letter = LETTERS[options.index(right)]
    body = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    prompt = f"{question}\n{body}\nAnswer with the letter of the correct option in \\boxed{{}}."
    return {"prompt": prompt, "reasoning": why + f" That is option {letter}.",
            "response": f"The answer is \\boxed{{{letter}}}.", "verifier": {"kind": KIND, "answer": letter}}


def extract_letter(response: str) -> str | None:
    """The chosen letter: from the last ``\\boxed{}``, else from a final ``Answer: X``."""
    answer = final_answer(response)
    boxed = last_boxed(answer)
    if boxed is not None:
        m = re.fullmatch(r"\(?([A-D])\)?", boxed.strip())
        return m.group(1) if m else None
    m = re.findall(r"[Aa]nswer\s*(?:is|:)?\s*\(?([A-D])\)?\b", answer)
    return m[-1] if m else None


def verify(response: str, spec: dict) -> float:
    return float(extract_letter(response) == spec["answer"])
