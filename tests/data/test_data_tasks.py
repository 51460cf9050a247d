"""The task generators' own answers verify; wrong answers do not; code runs sandboxed with a timeout."""

from __future__ import annotations

import random

import pytest

from cascade_jax.data.tasks import TASKS, verify
from cascade_jax.data.tasks.answers import last_boxed, parse_number
from cascade_jax.data.tasks.instruction_following import check
from cascade_jax.data.tasks.python_functions import run_tests


@pytest.mark.parametrize("name", ["math", "instruction_following", "multiple_choice"])
def test_generated_answers_verify(name):
    rng = random.Random(1)
    for _ in range(50):
        t = TASKS[name].generate(rng)
        assert verify(f"<think>{t['reasoning']}</think>{t['response']}", t["verifier"]) == 1.0
        wrong = "I do not know."
        if name == "instruction_following":  # add the forbidden word: at least that constraint fails
            banned = next(c["word"] for c in t["verifier"]["constraints"] if c["type"] == "exclude_keyword")
            wrong = t["response"] + " " + banned
        assert verify(f"<think>x</think>{wrong}", t["verifier"]) < 1.0


def test_code_tasks_verify_and_reject():
    rng = random.Random(2)
    for _ in range(3):
        t = TASKS["code"].generate(rng)
        assert verify(t["response"], t["verifier"]) == 1.0
        name = t["prompt"].split("`")[1].split("(")[0]
        assert verify(f"```python\ndef {name}(x):\n    return 0\n```", t["verifier"]) == 0.0


def test_code_timeout_and_crash():
    assert run_tests("while True:\n    pass\n", ["assert True"], timeout_s=1.0) == (0, 1)
    assert run_tests("import os\nos._exit(3)\n", ["assert True"]) == (0, 1)
    assert run_tests("def f(x):\n    return x\n", ["assert f(1) == 1", "assert f(2) == 3"]) == (1, 2)


def test_answer_parsing():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{3}{4}} c") == r"\frac{3}{4}"
    assert parse_number(r"\frac{3}{4}") == parse_number("0.75") == parse_number("3/4")
    assert verify(r"<think>\boxed{5}</think>so \boxed{1,000}", {"kind": "boxed_number", "answer": "1000"}) == 1.0
    assert verify(r"\boxed{5}</think>no box", {"kind": "boxed_number", "answer": "5"}) == 0.0  # only the answer counts
    assert verify("Answer: (C)", {"kind": "mcq", "answer": "C"}) == 1.0
    assert check({"type": "bullets", "n": 2}, "- a\n- b") and not check({"type": "bullets", "n": 2}, "- a")
    assert check({"type": "json"}, '{"a": 1}') and not check({"type": "json"}, "{a}")
    with pytest.raises(ValueError, match="unknown verifier kind"):
        verify("x", {"kind": "nope"})


def _prompts(name):
    import json

    from cascade_jax.data import TINY_DATA

    with open(f"{TINY_DATA}/{name}.jsonl") as f:
        return {m["content"] for line in f for m in json.loads(line)["messages"] if m["role"] == "user"}


def test_bundled_splits_are_disjoint_and_verifiable():
    import json

    from cascade_jax.data import TINY_DATA

    held_out = _prompts("eval")
    assert not held_out & _prompts("sft") and not held_out & _prompts("rl") and not held_out & _prompts("sft_eval")
    assert not _prompts("sft_eval") & _prompts("sft")
    with open(f"{TINY_DATA}/rl.jsonl") as f:
        rows = [json.loads(line) for line in f][:40]
    assert {r["domain"] for r in rows} == set(TASKS)
    assert all(r["verifier"]["kind"] in {m.KIND for m in TASKS.values()} for r in rows)


@pytest.mark.slow
def test_bundled_assets_regenerate_identically(tmp_path):
    import filecmp
    import os
    import subprocess
    import sys

    from cascade_jax.data import TINY_DATA, TINY_TOKENIZER

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    subprocess.run([sys.executable, f"{root}/scripts/make_tiny_data.py", "--out", str(tmp_path / "tiny")], check=True)
    subprocess.run([sys.executable, f"{root}/scripts/make_tiny_tokenizer.py", "--data", str(tmp_path / "tiny"),
                    "--out", str(tmp_path / "tok")], check=True)
    for name in ("sft", "sft_eval", "rl", "eval"):
        assert filecmp.cmp(tmp_path / "tiny" / f"{name}.jsonl", f"{TINY_DATA}/{name}.jsonl", shallow=False), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / "tok" / name, f"{TINY_TOKENIZER}/{name}", shallow=False), name
