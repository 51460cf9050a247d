"""Run checkpoints with Orbax: train state + data-iterator state, async, keep-last-K, atomic.

Restoring walks back from the newest step: a checkpoint that fails to restore (corrupt or partial)
is reported and the previous one is used instead.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from cascade_jax.train.state import TrainState

log = logging.getLogger(__name__)


class RunCheckpoints:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        if not force and step % self.every:
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """(state, data_state) of one step, in the shardings of `abstract_state`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if there is none."""
        for step in reversed(self.steps()):
            try:
                return step, *self.restore(step, abstract_state)
            except Exception as e:  # corrupt or partial: fall back to the one before
                log.warning("checkpoint at step %d does not restore (%s: %s); trying the previous one",
                            step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
