"""The loop every trainer shares: resume, stop signals, NaN stop, metrics, evaluation cadence, progress bar,
checkpoints and the run record. What a step computes comes from a `Task` (SFT: packed batches and the
next-token loss; GRPO: rollouts and the policy-gradient loss).

    result = TrainLoop(run_dir, steps=300, checkpoint=CheckpointSection(), log_every=10).run(task, state)

Order of events: restore the newest checkpoint that restores (with the task's data state) → if that is
the last step, stop without writing anything → fetch the first batch → on a fresh run write the run record
(so a run that fails on bad input leaves nothing behind) → evaluate at step 0 → steps. SIGTERM/SIGINT
between steps save a checkpoint at the end of the current step; while the loop waits for data they stop
the wait at once and save the last finished step. The end of the data ends the run the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
from tqdm import tqdm

from cascade_jax.train.checkpoint import RunCheckpoints
from cascade_jax.train.config import CheckpointSection
from cascade_jax.train.metrics import MetricsWriter

COMPLETE_FILE = "complete.json"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message says which checkpoints are kept."""


class StopRequested(BaseException):
    """Raised by the signal handler while the loop waits for data (BaseException: no `except Exception`
    inside a data pipeline swallows it)."""


class Task(Protocol):
    """What a trainer plugs into the loop."""

    def next_batch(self, state: Any, step: int) -> Any:
        """The batch of `step` (1-based); raises StopIteration at the end of the data."""

    def train(self, state: Any, batch: Any) -> tuple[Any, dict[str, float]]:
        """One update: the new state and host-side metrics (`loss`, `grad_norm`, …, plus optional per-step
        `tokens` and `flops` counters for throughput)."""

    def data_state(self) -> dict:
        """JSON-friendly position of the data after the last `next_batch`."""

    def restore_data(self, data_state: dict) -> None:
        ...


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """`run(state, step) -> metrics` every `every` steps (and at step 0); 0 disables it."""

    every: int
    run: Callable[[Any, int], dict[str, float]]


@dataclasses.dataclass
class LoopResult:
    step: int                     # the last step trained (or found, when already complete)
    steps: int                    # the step count asked for
    reason: str                   # "complete" | "already_complete" | "signal" | "end_of_data"
    metrics: dict[str, float]     # the last logged value of every metric
    checkpoint_steps: list[int]
    detail: str = ""              # e.g. which signal


class _Signals:
    """SIGTERM/SIGINT set `received`; while `waiting` (a data fetch) they raise StopRequested instead."""

    def __init__(self):
        self.received, self.waiting, self._previous = None, False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name
        if self.waiting:
            raise StopRequested(self.received)

    @contextlib.contextmanager
    def interruptible(self):
        if self.received:
            raise StopRequested(self.received)
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def read_complete(run_dir: str) -> dict | None:
    """The marker a finished run leaves: {"step": reached, "steps": asked for}; None while unfinished."""
    path = os.path.join(run_dir, COMPLETE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class TrainLoop:
    def __init__(self, run_dir: str, *, steps: int, checkpoint: CheckpointSection, log_every: int = 10,
                 resume: bool = True, evaluations: tuple[Evaluation, ...] = (), run_record: dict[str, str] | None = None,
                 peak_flops: float | None = None, desc: str = "train"):
        """`run_record`: file name → text written into `run_dir` when a fresh run has its first batch.
        `peak_flops`: FLOP/s of all devices together, for MFU (None: no MFU)."""
        self.run_dir, self.steps, self.checkpoint, self.log_every = run_dir, steps, checkpoint, log_every
        self.resume, self.evaluations, self.run_record = resume, evaluations, run_record or {}
        self.peak_flops, self.desc = peak_flops, desc
        self.main_process = jax.process_index() == 0
        self.checkpoints: RunCheckpoints | None = None
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def _open_checkpoints(self) -> RunCheckpoints:
        c = self.checkpoint
        return RunCheckpoints(self.checkpoint_dir, every=c.every, keep=c.keep, async_save=c.async_save)

    def _restore(self, task: Task, state):
        if not (self.resume and os.path.isdir(self.checkpoint_dir)):
            return 0, state
        self.checkpoints = self._open_checkpoints()
        restored = self.checkpoints.restore_latest(state)
        if restored is None:
            return 0, state
        start, state, data_state = restored
        task.restore_data(data_state)
        tqdm.write(f"{self.desc}: resumed from step {start} in {self.checkpoint_dir}")
        return start, state

    def _write_run_record(self) -> None:
        if not self.main_process:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        for name, text in self.run_record.items():
            with open(os.path.join(self.run_dir, name), "w") as f:
                f.write(text)

    # ------------------------------------------------------------------ the loop
    def run(self, task: Task, state) -> tuple[Any, LoopResult]:
        """Train to `steps`; returns (final state, result). Raises TrainingDiverged on a non-finite loss."""
        start, state = self._restore(task, state)
        if start >= self.steps:
            return state, self._result(start, "already_complete")
        writer = None
        step, saved = start, start
        try:
            with _Signals() as signals, tqdm(total=self.steps, initial=start, desc=self.desc, unit="step",
                                             dynamic_ncols=True) as bar:
                try:
                    with signals.interruptible():
                        batch = task.next_batch(state, start + 1)
                except StopIteration:
                    raise ValueError(f"the data holds no batch for step {start + 1}: nothing to train") from None
                if self.checkpoints is None:
                    self._write_run_record()
                    self.checkpoints = self._open_checkpoints()
                writer = MetricsWriter(self.run_dir, enabled=self.main_process)
                if start == 0:
                    self._evaluate(state, 0, writer)
                data_state = task.data_state()
                window = _Window()
                for step in range(start + 1, self.steps + 1):
                    state, metrics = task.train(state, batch)
                    self._check_finite(step, metrics)
                    window.add(metrics)
                    if step % self.log_every == 0 or step == self.steps or signals.received:
                        self._log(step, window.metrics(metrics, self.peak_flops), writer)
                        window = _Window()
                    bar.update(1)
                    self._evaluate(state, step, writer)
                    if self.checkpoints.save(step, state, data_state, force=bool(signals.received) or step == self.steps):
                        saved = step
                    if signals.received:
                        return state, self._stopped(step, "signal", signals.received)
                    if step == self.steps:
                        break
                    try:
                        with signals.interruptible():
                            batch = task.next_batch(state, step + 1)
                    except StopRequested:
                        return state, self._save_last(step, saved, state, data_state, "signal", signals.received)
                    except StopIteration:
                        result = self._save_last(step, saved, state, data_state, "end_of_data")
                        self._mark_complete(step)   # a rerun says so instead of finding no batch
                        return state, result
                    data_state = task.data_state()
        except StopRequested as stop:   # during the first fetch: nothing trained since the last checkpoint
            return state, self._result(step, "signal", str(stop))
        finally:
            if self.checkpoints is not None:
                self.checkpoints.close()
            if writer is not None:
                writer.close()
        self._mark_complete(step)
        return state, self._result(step, "complete")

    def _save_last(self, step, saved, state, data_state, reason, detail="") -> LoopResult:
        if saved != step:
            self.checkpoints.save(step, state, data_state, force=True)
        return self._stopped(step, reason, detail)

    def _stopped(self, step, reason, detail="") -> LoopResult:
        self.checkpoints.wait()
        return self._result(step, reason, detail)

    def _result(self, step, reason, detail="") -> LoopResult:
        steps = self.checkpoints.steps() if self.checkpoints is not None else _listed_steps(self.checkpoint_dir)
        return LoopResult(step=step, steps=self.steps, reason=reason, metrics=dict(self.last),
                          checkpoint_steps=steps, detail=detail)

    def _mark_complete(self, step: int) -> None:
        """{"step": reached, "steps": asked for}; step < steps when the data ended the run."""
        if self.main_process:
            with open(os.path.join(self.run_dir, COMPLETE_FILE), "w") as f:
                json.dump({"step": step, "steps": self.steps}, f)

    def _check_finite(self, step: int, metrics: dict) -> None:
        bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])}
        if not bad:
            return
        kept = self.checkpoints.steps() if self.checkpoints is not None else []
        keeps = (f"kept: the checkpoints at steps {', '.join(map(str, kept))} in {self.checkpoint_dir}" if kept
                 else "no checkpoint was saved before it (the first is due at step "
                      f"{self.checkpoint.every}); nothing is kept")
        values = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise TrainingDiverged(f"step {step}: {values}; training stopped, {keeps}")

    def _evaluate(self, state, step: int, writer: MetricsWriter) -> None:
        results = {}
        for evaluation in self.evaluations:
            if evaluation.every > 0 and step % evaluation.every == 0:
                results.update(evaluation.run(state, step))
        if results:
            writer.write(step, results)
            self.last.update(results)
            tqdm.write(format_line(step, self.steps, results))

    def _log(self, step: int, metrics: dict[str, float], writer: MetricsWriter) -> None:
        writer.write(step, metrics)
        self.last.update(metrics)
        tqdm.write(format_line(step, self.steps, metrics))


class _Window:
    """Throughput over the steps since the last log line."""

    def __init__(self):
        self.start, self.tokens, self.flops = time.perf_counter(), 0.0, 0.0

    def add(self, metrics: dict) -> None:
        self.tokens += metrics.pop("tokens", 0.0)
        self.flops += metrics.pop("flops", 0.0)

    def metrics(self, last: dict, peak_flops: float | None) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = dict(last)
        if self.tokens:
            out["tokens_per_s"] = self.tokens / elapsed
        if self.flops and peak_flops:
            out["mfu"] = self.flops / elapsed / peak_flops
        return out


def _listed_steps(checkpoint_dir: str) -> list[int]:
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


_ORDER = ("loss", "grad_norm", "lr", "expert_imbalance", "eval_loss", "eval_accuracy", "eval_reward",
          "tokens_per_s", "mfu")


def format_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    """`step 10/300  loss 5.123  grad_norm 1.02  …`: the known metrics first, the rest alphabetically."""
    keys = [k for k in _ORDER if k in metrics] + sorted(k for k in metrics if k not in _ORDER)
    return f"step {step}/{steps}  " + "  ".join(f"{k} {_number(metrics[k])}" for k in keys)


def _number(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value)}" if abs(value) < 1e15 else f"{value:.3g}"
