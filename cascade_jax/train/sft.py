"""SFT: a model, packed chat data and the next-token loss, run by the shared `TrainLoop`.

A run directory follows the checkpoint contract (`cascade_jax.weights.orbax_params`): cascade_config.json
(the model), config.yaml (this run's config), checkpoints/<step>/{state,data}, metrics.jsonl, tensorboard/,
and complete.json once the run has reached its last step or the end of its data. Re-running the same
command resumes from the newest checkpoint that restores, on the same data batches.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from cascade_jax.config import ModelConfig
from cascade_jax.data import SFTData
from cascade_jax.parallel import initialize_distributed, make_mesh, mesh_context, shard_batch
from cascade_jax.train.config import SFTConfig
from cascade_jax.train.evaluation import HeldOutLoss, TaskAccuracy, held_out_data, read_task_prompts
from cascade_jax.train.loop import Evaluation, LoopResult, TrainingDiverged, TrainLoop
from cascade_jax.train.metrics import peak_flops_per_device, train_flops_per_token
from cascade_jax.train.optimizer import build_optimizer, learning_rate_schedule
from cascade_jax.train.setup import check_resume, initial_state, run_record
from cascade_jax.train.step import NextTokenLoss, train_step

__all__ = ["TrainingDiverged", "run_sft"]


def _document_tokens(segment_ids: np.ndarray) -> tuple[int, int]:
    """(non-padding tokens, Σ over documents of length²) of a batch, for FLOP accounting."""
    tokens, squares = 0, 0
    for row in segment_ids.reshape(-1, segment_ids.shape[-1]):
        lengths = np.bincount(row[row > 0])
        tokens += int(lengths.sum())
        squares += int(np.square(lengths.astype(np.int64)).sum())
    return tokens, squares


class SFTTask:
    """The SFT side of the loop: `micro_batches` packed batches per step, the jitted step, FLOP counts."""

    def __init__(self, cfg: SFTConfig, data: SFTData, graphdef, tx, model_config: ModelConfig, mesh):
        self.cfg, self.data, self.iterator = cfg, data, iter(data)
        self.graphdef, self.tx, self.mesh, self.model_config = graphdef, tx, mesh, model_config
        self.loss_fn = NextTokenLoss(cfg.train.loss_chunk_size)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)

    def next_batch(self, state, step: int) -> dict[str, np.ndarray]:
        slices = [next(self.iterator) for _ in range(self.cfg.train.micro_batches)]
        return {k: np.stack([s[k] for s in slices]) for k in slices[0]}

    def train(self, state, batch):
        placed = batch if self.mesh is None else shard_batch(batch, self.mesh)
        step = int(state.step)
        state, metrics = train_step(state, placed, graphdef=self.graphdef, tx=self.tx, loss_fn=self.loss_fn,
                                    bias_update_rate=self.cfg.moe.bias_update_rate)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tokens, squares = _document_tokens(batch["segment_ids"])
        metrics.update(lr=float(self.schedule(step)), tokens=float(tokens),
                       flops=train_flops_per_token(self.model_config, squares / max(tokens, 1)) * tokens)
        return state, metrics

    def data_state(self) -> dict:
        return self.iterator.get_state()

    def restore_data(self, data_state: dict) -> None:
        self.iterator.set_state(data_state)


def _evaluations(cfg: SFTConfig, data: SFTData, graphdef, loss_fn) -> tuple[Evaluation, ...]:
    t, out = cfg.train, []
    if t.eval_data and t.eval_every > 0:
        held_out = held_out_data(cfg.data, t.eval_data)
        out.append(Evaluation(t.eval_every, HeldOutLoss(held_out, data.tokenizer, graphdef, loss_fn, t.eval_batches)))
    if t.accuracy_eval_tasks and t.accuracy_eval_every > 0:
        tasks = read_task_prompts(t.accuracy_eval_tasks, t.accuracy_eval_samples)
        out.append(Evaluation(t.accuracy_eval_every, TaskAccuracy(
            tasks, data.tokenizer, graphdef, thinking=t.accuracy_thinking, max_new_tokens=t.accuracy_max_new_tokens)))
    return tuple(out)


def run_sft(cfg: SFTConfig) -> LoopResult:
    """Train (or resume) to `train.steps`; raises TrainingDiverged on a non-finite loss.

    With `mesh` sizes other than all-1 the state is sharded over a device mesh (joining a multi-host job
    first when the environment describes one; see `cascade_jax.parallel.distributed`)."""
    complete = check_resume(cfg)
    if complete is not None:
        return LoopResult(step=complete["step"], steps=cfg.train.steps, reason="already_complete", metrics={},
                          checkpoint_steps=sorted(int(n) for n in os.listdir(os.path.join(cfg.run_dir, "checkpoints"))
                                                  if n.isdigit()))
    mesh = None
    if not cfg.mesh.is_single_device():
        initialize_distributed()
        mesh = make_mesh(cfg.mesh)
    with mesh_context(mesh):
        return _run(cfg, mesh)


def _run(cfg: SFTConfig, mesh) -> LoopResult:
    t = cfg.train
    data = SFTData(cfg.data)
    tx = build_optimizer(cfg.optimizer, t.steps)
    graphdef, state, model_config = initial_state(cfg, tx, mesh)
    task = SFTTask(cfg, data, graphdef, tx, model_config, mesh)
    record = run_record(cfg, model_config)
    peak = peak_flops_per_device(t.peak_flops_per_device)
    loop = TrainLoop(cfg.run_dir, steps=t.steps, checkpoint=cfg.checkpoint, log_every=t.log_every,
                     resume=cfg.resume, evaluations=_evaluations(cfg, data, graphdef, task.loss_fn),
                     run_record=record, peak_flops=peak * jax.device_count() if peak else None, desc="sft")
    _, result = loop.run(task, state)
    return result
