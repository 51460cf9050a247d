"""Small Python function tasks with unit tests, checked by running the code in a subprocess."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile

from cascade_jax.data.tasks.answers import final_answer

KIND = "python_tests"

# (name, description, reference body, test inputs); {k} and {m} are drawn per task.
_FAMILIES = (
    ("affine", "returns {k} * x + {m}", "    return {k} * x + {m}", (0, 1, -5, 100)),
    ("count_multiples", "returns how many integers i with {m} <= i < x are divisible by {k}",
     "    return sum(1 for i in range({m}, x) if i % {k} == 0)", (0, 1, 10, 37, 120)),
    ("sum_of_powers", "returns the sum of i**{p} for i from {m} to x inclusive (0 if x < {m})",
     "    return sum(i ** {p} for i in range({m}, x + 1))", (0, 1, 4, 9, 25)),
    ("clip", "returns x limited to the interval [-{m}, {k}]", "    return max(-{m}, min({k}, x))",
     (-50, -1, 0, 2, 50)),
    ("digit_sum_mod", "returns (the sum of the decimal digits of abs(x)) + {m}, modulo {k}",
     "    return (sum(int(d) for d in str(abs(x))) + {m}) % {k}", (0, 7, 1234, -999)),
    ("repeat_string", "returns the string str(x) repeated {k} times, followed by {m} exclamation marks",
     "    return str(x) * {k} + '!' * {m}", (0, 5, -12, 300)),
)


def _reference(name: str, body: str) -> str:
    return f"def {name}(x):\n{body}\n"


def generate(rng: random.Random) -> dict:
    name, desc, body, inputs = rng.choice(_FAMILIES)
    k, m, p = rng.randint(2, 12), rng.randint(0, 20), rng.randint(1, 3)
    desc, body = desc.format(k=k, m=m, p=p), body.format(k=k, m=m, p=p)
    code = _reference(name, body)
    scope: dict = {}
    exec(code, scope)  # the reference is our own generated code; computes the expected outputs
    tests = [f"assert {name}({x}) == {scope[name](x)!r}" for x in inputs]
    prompt = (f"Write a Python function `{name}(x)` that {desc}. "
              "Reply with the code in a ```python block.")
    reasoning = f"The function must {desc}. A direct implementation:\n{body.strip()}"
    response = f"```python\n{code}```"
    return {"prompt": prompt, "reasoning": reasoning, "response": response,
            "verifier": {"kind": KIND, "tests": tests, "timeout_s": 5.0}}


def extract_code(response: str) -> str | None:
    """The last fenced ```python block of the final answer (or the last fenced block of any kind)."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", final_answer(response), re.DOTALL)
    return blocks[-1] if blocks else None


def _limits() -> None:  # runs in the child before exec (POSIX only)
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
    os.setsid()


def run_tests(code: str, tests: list[str], timeout_s: float = 5.0) -> tuple[int, int]:
    """Runs ``code`` then each test in a fresh isolated Python; returns (passed, total)."""
    if not tests:
        return 0, 0
    runner = (code + "\n\n_passed = 0\n" + "".join(
        f"try:\n    {t}\n    _passed += 1\nexcept BaseException:\n    pass\n" for t in tests)
        + "print('__PASSED__', _passed)\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "solution.py")
        with open(path, "w") as f:
            f.write(runner)
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", path], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                                  preexec_fn=_limits if os.name == "posix" else None)
        except subprocess.TimeoutExpired:
            return 0, len(tests)
    m = re.search(r"__PASSED__ (\d+)\s*$", proc.stdout)
    return (int(m.group(1)) if m else 0), len(tests)


def verify(response: str, spec: dict) -> float:
    """1.0 if the extracted code passes every unit test within the timeout, else 0.0."""
    code = extract_code(response)
    if code is None:
        return 0.0
    passed, total = run_tests(code, spec["tests"], spec.get("timeout_s", 5.0))
    return float(total > 0 and passed == total)
