"""Rewards computed in a pool of worker processes that survives rewards which raise, hang or crash.

Why processes: rewards are CPU bound (sympy, jsonschema, unit tests) and some bound their own time with
``signal.alarm``, which works only in a process's main thread, so each reward runs in a worker's main thread.
Workers start with "forkserver" (or "spawn"), never "fork": the trainer process runs JAX threads.

Why our own workers rather than ``ProcessPoolExecutor``: an executor cannot cancel a running task, so a
hung reward would hold a worker forever. Here each worker has its own pipe; a reward past ``timeout_s``
(wall clock, from the moment it is sent) gets its worker's process group killed and a fresh worker started.

Outcomes, one per item, counted in ``score``'s third result:
    ok       the reward returned (its reward and details as is)
    error    the reward raised: reward 0, details {"error": one line, "outcome": "error"}
    timeout  past timeout_s: reward 0, the worker is killed and replaced
    crash    the worker died (os._exit, segfault, OOM kill): reward 0, the worker is replaced

Workers look rewards up by kind in ``cascade_jax.rl.rewards.REWARDS`` (what travels is (response,
metadata), never a function); ``extra_modules`` names modules whose own ``REWARDS`` dicts are added in each
worker (tests register failure-injecting kinds this way).

    with RewardPool(num_workers=4, timeout_s=30) as pool:
        rewards, details, counts = pool.score(responses, metadatas)

``score`` is meant for one caller at a time (the GRPO loop); it is not thread-safe.
"""

from __future__ import annotations

import collections
import importlib
import math
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from multiprocessing.connection import wait

OUTCOMES = ("ok", "error", "timeout", "crash")
START_TIMEOUT_S = 180.0     # a worker imports jax (through cascade_jax) and sympy before it is ready
MAX_START_FAILURES = 3      # consecutive workers that fail to start before the pool gives up
_JOIN_S = 5.0
_ERROR_CHARS = 300
_PRELOAD = ("cascade_jax.rl.rewards", "math_verify", "jsonschema")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:_ERROR_CHARS] if text else type(e).__name__


def _exit_with_pool(lifeline) -> None:
    """Ends the worker as soon as the pool's end of ``lifeline`` closes (close(), or the trainer dies), even
    while a reward hangs. The parent pid cannot tell: a fork-server child outlives the trainer, and keeps its
    fork server alive too (every child holds the server's liveness pipe)."""

    def watch() -> None:
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="pool-lifeline", daemon=True).start()


def _score_one(compute, response: str, metadata: dict) -> tuple[float, dict, str]:
    try:
        reward, details = compute(response, metadata)
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward is {reward}")
        return reward, details, "ok"
    except BaseException as e:  # SystemExit, math-verify's TimeoutException: none may end the worker
        return 0.0, {"error": _one_line(e), "outcome": "error"}, "error"


def _worker_main(conn, lifeline, modules: tuple[str, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it closes the pool
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # own process group: a timeout kills the reward's subprocesses with it
    try:
        from cascade_jax.rl import rewards

        for name in modules:
            rewards.REWARDS.update(importlib.import_module(name).REWARDS)
        # Warm up sympy/antlr so that the first math reward's own timeout does not pay for it.
        rewards.compute_reward("\\boxed{1/2}", {"verifier": {"kind": "math", "answer": "0.5"}})
    except BaseException as e:
        conn.send(("failed", _one_line(e)))
        return
    _exit_with_pool(lifeline)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, response, metadata = message
        reward, details, outcome = _score_one(rewards.compute_reward, response, metadata)
        try:
            conn.send(("result", index, reward, details, outcome))
        except (EOFError, OSError):
            return
        except Exception as e:  # details that do not pickle: nothing was written to the pipe yet
            conn.send(("result", index, 0.0, {"error": f"details not picklable: {_one_line(e)}",
                                              "outcome": "error"}, "error"))


class _Worker:
    __slots__ = ("process", "conn", "lifeline", "ready", "item", "deadline")

    def __init__(self, process, conn, lifeline, start_deadline: float):
        self.process, self.conn, self.lifeline = process, conn, lifeline
        self.ready = False
        self.item: int | None = None
        self.deadline = start_deadline  # start deadline until ready, then the current item's


def _stop(worker: _Worker, grace_s: float) -> None:
    """Ends one worker and reaps it: waits ``grace_s`` for it to exit, then kills its process group."""
    p = worker.process
    p.join(grace_s)
    if p.is_alive():
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (OSError, AttributeError):  # not yet its own group, already gone, or not POSIX
            pass
        p.kill()
        p.join(_JOIN_S)
    worker.conn.close()
    worker.lifeline.close()
    if p.exitcode is not None:
        p.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:  # ask all first, so that they exit in parallel
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        _stop(w, _JOIN_S)
    workers.clear()


class RewardPool:
    """Computes ``compute_reward`` for batches in ``num_workers`` processes; see the module docstring."""

    def __init__(self, num_workers: int | None = None, timeout_s: float = 30.0, *,
                 extra_modules: tuple[str, ...] = (), start_method: str | None = None):
        self.num_workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        if self.num_workers < 1:
            raise ValueError(f"RewardPool num_workers must be >= 1, got {self.num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.extra_modules = tuple(extra_modules)
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if start_method == "fork":
            raise ValueError("RewardPool start_method 'fork' is unsafe next to JAX threads; use forkserver or spawn")
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Imported once in the server, so a replacement worker starts in milliseconds, not seconds
            # (ignored when the server already runs: workers then import for themselves).
            self._ctx.set_forkserver_preload([*_PRELOAD, *self.extra_modules])
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self._start_failures = 0
        self._building = True
        try:
            for _ in range(self.num_workers):
                self._workers.append(self._start())
            self._await_ready()
        except BaseException:
            self.close()
            raise
        self._building = False

    # ------------------------------------------------------------------ workers
    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        watch_end, lifeline = self._ctx.Pipe(duplex=False)  # only this process holds `lifeline`
        process = self._ctx.Process(target=_worker_main, args=(child, watch_end, self.extra_modules), daemon=True,
                                    name="reward-worker")
        process.start()
        child.close()
        watch_end.close()
        return _Worker(process, parent, lifeline, time.monotonic() + START_TIMEOUT_S)

    def _replace(self, worker: _Worker) -> None:
        _stop(worker, 0.0)
        self._workers[self._workers.index(worker)] = self._start()

    def _start_failed(self, worker: _Worker, why: str) -> None:
        # While the pool is being built any failure is reported (a bad extra module, a broken install);
        # later a replacement may fail once or twice (an OOM kill while importing) before the pool gives up.
        self._start_failures += 1
        if self._building or self._start_failures >= MAX_START_FAILURES:
            raise RuntimeError(f"reward worker failed to start: {why}")
        self._replace(worker)

    def _await_ready(self) -> None:
        while not all(w.ready for w in self._workers):
            self._step(None)

    def _step(self, finish) -> None:
        """Waits for the next message, exit or deadline, then handles what happened to each worker."""
        deadlines = [w.deadline for w in self._workers if w.item is not None or not w.ready]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        wait([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers], timeout)
        now = time.monotonic()
        for w in list(self._workers):
            if w.conn.poll():  # a message, or end of file when the worker is gone
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    self._died(w, finish)
                    continue
                if message[0] == "ready":
                    w.ready, self._start_failures = True, 0
                elif message[0] == "failed":
                    self._start_failed(w, message[1])
                elif message[1] == w.item:  # ("result", index, reward, details, outcome)
                    finish(*message[1:])
                    w.item = None
            elif not w.process.is_alive():
                self._died(w, finish)
            elif now >= w.deadline and not w.ready:
                self._start_failed(w, f"not ready after {START_TIMEOUT_S:g} s")
            elif now >= w.deadline and w.item is not None:
                finish(w.item, 0.0, {"error": f"timed out after {self.timeout_s:g} s", "outcome": "timeout"},
                       "timeout")
                self._replace(w)

    def _died(self, worker: _Worker, finish) -> None:
        worker.process.join(_JOIN_S)
        code = worker.process.exitcode
        if not worker.ready:
            self._start_failed(worker, f"exited with code {code} while starting")
            return
        if worker.item is not None:
            finish(worker.item, 0.0, {"error": f"worker died (exit code {code})", "outcome": "crash"}, "crash")
        self._replace(worker)

    # ------------------------------------------------------------------ public
    def score(self, responses: list[str], metadatas: list[dict]) -> tuple[list[float], list[dict], dict[str, int]]:
        """(rewards, details, counts by outcome) for each (response, metadata); never raises for an item."""
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        if len(responses) != len(metadatas):
            raise ValueError(f"RewardPool.score: {len(responses)} responses but {len(metadatas)} metadatas")
        rewards = [0.0] * len(responses)
        details: list[dict] = [{} for _ in responses]
        counts = dict.fromkeys(OUTCOMES, 0)

        def finish(index: int, reward: float, info: dict, outcome: str) -> None:
            rewards[index], details[index] = reward, info
            counts[outcome] += 1

        pending = collections.deque(range(len(responses)))
        while pending or any(w.item is not None for w in self._workers):
            for w in list(self._workers):
                if not (pending and w.ready and w.item is None):
                    continue
                index = pending.popleft()
                try:
                    w.conn.send((index, responses[index], metadatas[index]))
                except (OSError, EOFError):
                    pending.appendleft(index)  # the worker was gone before the item reached it
                    self._replace(w)
                    continue
                except Exception as e:  # an item that does not pickle
                    finish(index, 0.0, {"error": f"cannot send item: {_one_line(e)}", "outcome": "error"}, "error")
                    continue
                w.item, w.deadline = index, time.monotonic() + self.timeout_s
            self._step(finish)
        return rewards, details, counts

    def close(self) -> None:
        """Stops and reaps every worker (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
