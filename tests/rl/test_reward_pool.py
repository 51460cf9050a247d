"""RewardPool: same rewards as in process; raising, hanging and crashing rewards give 0, are counted, and the
pool keeps working; math-verify's alarm works in the workers; nothing is left running after close()."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cascade_jax.data.chat_template import render_tool_calls
from cascade_jax.data.tasks import TASKS
from cascade_jax.rl.rewards import compute_reward
from cascade_jax.rl.rewards.pool import OUTCOMES, RewardPool

ROOT = pathlib.Path(__file__).parents[2]
TIMEOUT_S = 4.0
FAKES = ("tests.rl.fake_rewards",)
HAS_SANDBOX = importlib.util.find_spec("cascade_jax.rl.sandbox") is not None


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT_S, extra_modules=FAKES) as p:
        yield p


def meta(**verifier) -> dict:
    return {"verifier": verifier, "domain": "test"}


def _mixed_batch() -> tuple[list[str], list[dict]]:
    responses, metadatas = [], []
    for task, module in sorted(TASKS.items()):
        if module.KIND == "python_tests" and not HAS_SANDBOX:
            continue
        for i in range(3):
            sample = module.generate(random.Random(100 + i))
            m = {"verifier": sample["verifier"], "domain": task}
            responses += [f"<think>{sample['reasoning']}</think>{sample['response']}", "<think>?</think>no idea"]
            metadatas += [m, m]
    calls = [{"name": "f", "arguments": {"x": 1}}]
    responses += ["\\boxed{\\frac{1}{2}}", "\\boxed{0.3}", '{"a": 1}', "[]", render_tool_calls(calls, False), "x"]
    metadatas += [meta(kind="math", answer="0.5"), meta(kind="math", answer="0.5"),
                  meta(kind="json_schema", schema={"type": "object"}), meta(kind="json_schema", schema={"type": "object"}),
                  meta(kind="tool_call", calls=calls), meta(kind="tool_call", calls=calls)]
    return responses, metadatas


def test_pool_equals_in_process(pool):
    responses, metadatas = _mixed_batch()
    rewards, details, counts = pool.score(responses, metadatas)
    expected = [compute_reward(r, m) for r, m in zip(responses, metadatas)]
    assert rewards == [e[0] for e in expected]
    for got, (_, want) in zip(details, expected):
        if "verify_s" in want:  # a timing, not a result
            got, want = {**got, "verify_s": 0}, {**want, "verify_s": 0}
        assert got == want
    assert counts == {"ok": len(responses), "error": 0, "timeout": 0, "crash": 0}
    assert 0 < sum(rewards) < len(rewards)
    assert pool.score([], []) == ([], [], dict.fromkeys(OUTCOMES, 0))


def test_raising_rewards_give_zero_and_are_counted(pool):
    responses = ["x", "x", "x", "\\boxed{3}"]
    metadatas = [meta(kind="no_such_kind"), meta(kind="ifeval", constraints=[{"type": "language"}]),
                 meta(kind="test_raise"), meta(kind="boxed_number", answer="3")]
    rewards, details, counts = pool.score(responses, metadatas)
    assert rewards == [0.0, 0.0, 0.0, 1.0]
    assert counts == {"ok": 1, "error": 3, "timeout": 0, "crash": 0}
    assert details[0]["error"].startswith("ValueError: unknown verifier kind 'no_such_kind'")
    assert "unknown ifeval constraint type 'language'" in details[1]["error"]
    assert details[2] == {"error": "RuntimeError: injected failure second line", "outcome": "error"}
    assert all("\n" not in d["error"] for d in details[:3])


def test_hanging_reward_times_out_and_the_pool_recovers(pool):
    start = time.monotonic()
    rewards, details, counts = pool.score(["x", "\\boxed{2}", "x"], [meta(kind="test_hang"),
                                                                     meta(kind="boxed_number", answer="2"),
                                                                     meta(kind="test_hang")])
    elapsed = time.monotonic() - start
    assert rewards == [0.0, 1.0, 0.0]
    assert counts == {"ok": 1, "error": 0, "timeout": 2, "crash": 0}
    assert details[0] == {"error": f"timed out after {TIMEOUT_S:g} s", "outcome": "timeout"}
    assert elapsed < TIMEOUT_S + 3.0  # both hangs ran side by side, each bounded by timeout_s
    _check_next_batch(pool)


@pytest.mark.parametrize("kind,code", [("test_exit", 3), ("test_segfault", -11)])
def test_crashing_worker_gives_zero_and_is_replaced(pool, kind, code):
    before = _worker_pids(pool)
    rewards, details, counts = pool.score(["x", "\\boxed{5}"], [meta(kind=kind), meta(kind="boxed_number", answer="5")])
    assert rewards == [0.0, 1.0]
    assert counts == {"ok": 1, "error": 0, "timeout": 0, "crash": 1}
    assert details[0] == {"error": f"worker died (exit code {code})", "outcome": "crash"}
    assert _worker_pids(pool) != before
    _check_next_batch(pool)


def test_math_verify_timeout_works_in_the_workers(pool):
    # Comparing (x+1)^60 with its binomial expansion takes sympy far longer than this; math-verify's own
    # signal.alarm (1 s per step, set from the verifier) stops it inside the worker, well before the pool's.
    slow = meta(kind="math", answer="(x+1)^{60}", timeout_s=1)
    start = time.monotonic()
    rewards, details, counts = pool.score(["\\boxed{\\sum_{k=0}^{60}\\binom{60}{k}x^k}"], [slow])
    assert time.monotonic() - start < TIMEOUT_S
    assert rewards == [0.0] and counts["ok"] == 1 and details[0]["reason"] == "not equal"
    assert details[0]["verify_s"] >= 1.0


def test_rewards_run_in_separate_processes(pool):
    _, details, _ = pool.score(["x"] * 4, [meta(kind="test_pid")] * 4)
    pids = {d["pid"] for d in details}
    assert os.getpid() not in pids and pids <= set(_worker_pids(pool))


def test_close_leaves_no_process():
    p = RewardPool(num_workers=2, timeout_s=TIMEOUT_S, extra_modules=FAKES)
    # One worker is killed mid-task and replaced, so the replacement must be reaped too.
    p.score(["x", "\\boxed{1}"], [meta(kind="test_exit"), meta(kind="boxed_number", answer="1")])
    pids = _worker_pids(p)
    p.close()
    p.close()  # idempotent
    assert p.closed
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["x"], [meta(kind="boxed_number", answer="1")])
    deadline = time.monotonic() + 5.0
    while any(_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the fork server reaps its children asynchronously
    assert not any(_exists(pid) for pid in pids), [_state(pid) for pid in pids]


def test_a_hung_worker_exits_when_its_lifeline_closes(pool):
    # What the kernel does when the trainer dies (closes its end of each worker's lifeline), done by hand.
    def cut() -> None:
        busy = [w for w in pool._workers if w.item is not None]
        busy[0].lifeline.close()

    threading.Timer(1.0, cut).start()
    start = time.monotonic()
    rewards, details, counts = pool.score(["x"], [meta(kind="test_hang")])
    assert time.monotonic() - start < TIMEOUT_S  # the worker ended itself before the pool's timeout
    assert counts["crash"] == 1 and details[0] == {"error": "worker died (exit code 1)", "outcome": "crash"}
    _check_next_batch(pool)


@pytest.mark.slow
def test_workers_exit_when_the_trainer_dies():
    # A trainer killed while a reward hangs: the worker must not live on (nor keep its fork server alive).
    script = textwrap.dedent("""
        import os, threading
        from cascade_jax.rl.rewards.pool import RewardPool
        pool = RewardPool(num_workers=1, timeout_s=600, extra_modules=("tests.rl.fake_rewards",))
        print(pool._workers[0].process.pid, flush=True)
        threading.Timer(0.5, os.kill, (os.getpid(), 9)).start()
        pool.score(["x"], [{"verifier": {"kind": "test_hang"}}])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10.0
    while _exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _exists(pid), _state(pid)


def test_bad_extra_module_fails_at_construction():
    with pytest.raises(RuntimeError, match="failed to start"):
        RewardPool(num_workers=1, extra_modules=("tests.rl.no_such_module",))
    with pytest.raises(ValueError, match="fork"):
        RewardPool(num_workers=1, start_method="fork")


def _check_next_batch(pool) -> None:
    responses, metadatas = ["\\boxed{7}", "\\boxed{B}", "\\boxed{8}"], [
        meta(kind="boxed_number", answer="7"), meta(kind="mcq", answer="B"), meta(kind="boxed_number", answer="7")]
    rewards, _, counts = pool.score(responses, metadatas)
    assert rewards == [1.0, 1.0, 0.0] and counts["ok"] == 3


def _worker_pids(pool) -> list[int]:
    return [w.process.pid for w in pool._workers]


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _exists(pid: int) -> bool:
    if os.path.isdir("/proc"):
        return _state(pid) is not None  # a zombie ("Z") still counts as left behind
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_details_are_json_friendly(pool):
    responses, metadatas = _mixed_batch()
    _, details, _ = pool.score(responses[:6], metadatas[:6])
    json.dumps(details)
