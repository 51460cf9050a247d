"""The SFT loop: model + packed data + optimizer → train steps, metrics, evaluation, checkpoints.

Side effects live here; the math is in `step.py`. A run directory holds config.yaml, model_config.json,
metrics.jsonl, tensorboard/ and checkpoints/. Re-running the same command resumes from the newest
checkpoint that restores, on the same data batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cascade_jax.config import ModelConfig
from cascade_jax.data import SFTData
from cascade_jax.model.nemotron_h import NemotronH
from cascade_jax.parallel import initialize_distributed, logical_to_spec, make_mesh, mesh_context, shard_batch
from cascade_jax.train import evaluation
from cascade_jax.train.checkpoint import RunCheckpoints
from cascade_jax.train.config import SFTConfig, to_yaml
from cascade_jax.train.metrics import MetricsWriter, peak_flops_per_device, train_flops_per_token
from cascade_jax.train.optimizer import build_optimizer, learning_rate_schedule
from cascade_jax.train.state import init_sharded_train_state, init_train_state, shard_train_state
from cascade_jax.train.step import StepSettings, train_step
from cascade_jax.weights.load import load_pretrained

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def build_model(cfg: SFTConfig, seed: int, mesh: jax.sharding.Mesh | None = None) -> NemotronH:
    """With `mesh`, pretrained weights are read straight into their rule shardings."""
    m = cfg.model
    kwargs = dict(dtype=jnp.dtype(m.dtype), backends=m.backends)
    if m.from_pretrained:
        placement = {} if mesh is None else dict(
            mesh=mesh, partition=lambda _, v: logical_to_spec(v.logical_axes, v.shape, dict(mesh.shape)))
        model = load_pretrained(m.from_pretrained, param_dtype=jnp.dtype(m.param_dtype), **kwargs, **placement)
        model.remat = m.remat
        return model
    config = ModelConfig.preset(m.preset).replace(**m.overrides)
    return NemotronH(config, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(m.param_dtype), remat=m.remat, **kwargs)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _next_batch(iterator, micro_batches: int) -> dict[str, np.ndarray]:
    slices = [next(iterator) for _ in range(micro_batches)]
    return {k: np.stack([s[k] for s in slices]) for k in slices[0]}


def _document_tokens(segment_ids: np.ndarray) -> tuple[int, int]:
    """(non-padding tokens, Σ over documents of length²) of a batch, for FLOP accounting."""
    tokens, squares = 0, 0
    for row in segment_ids.reshape(-1, segment_ids.shape[-1]):
        lengths = np.bincount(row[row > 0])
        tokens += int(lengths.sum())
        squares += int(np.square(lengths.astype(np.int64)).sum())
    return tokens, squares


def _initial_state(cfg: SFTConfig, tx, mesh):
    """(graphdef, TrainState, ModelConfig): on one device as before, or created already sharded."""
    seed = cfg.train.seed
    if mesh is None:
        model = build_model(cfg, seed)
        return (*init_train_state(model, tx, seed), model.config)
    if cfg.model.from_pretrained:
        model = build_model(cfg, seed, mesh)
        return (*shard_train_state(model, tx, seed, mesh), model.config)
    graphdef, state = init_sharded_train_state(lambda: build_model(cfg, seed), tx, seed, mesh)
    return graphdef, state, nnx.merge(graphdef, state.params, state.expert_bias).config


def run_sft(cfg: SFTConfig) -> dict:
    """Train; returns the last logged metrics. Raises TrainingDiverged on a non-finite loss.

    With `mesh` sizes other than all-1 the state is sharded over a device mesh (joining a multi-host job
    first when the environment describes one; see `cascade_jax.parallel.distributed`)."""
    mesh = None
    if not cfg.mesh.is_single_device():
        initialize_distributed()
        mesh = make_mesh(cfg.mesh)
    with mesh_context(mesh):
        return _run(cfg, mesh)


def _run(cfg: SFTConfig, mesh) -> dict:
    t = cfg.train
    os.makedirs(cfg.run_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    tx = build_optimizer(cfg.optimizer, t.steps)
    schedule = learning_rate_schedule(cfg.optimizer, t.steps)
    graphdef, state, model_config = _initial_state(cfg, tx, mesh)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run_dir, "model_config.json"), "w") as f:
            json.dump(model_config.to_hf(), f, indent=2)
    settings = StepSettings(loss_chunk_size=t.loss_chunk_size, bias_update_rate=cfg.moe.bias_update_rate)

    data = SFTData(cfg.data)
    iterator = iter(data)
    checkpoints = RunCheckpoints(os.path.join(cfg.run_dir, "checkpoints"), every=cfg.checkpoint.every,
                                 keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    if cfg.resume:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            start, state, data_state = restored
            iterator.set_state(data_state)
            log.info("resumed from step %d", start)
    evaluator = evaluation.Evaluator(cfg, data.tokenizer, graphdef)
    writer = MetricsWriter(cfg.run_dir, enabled=jax.process_index() == 0)
    peak = peak_flops_per_device(t.peak_flops_per_device)
    last: dict = {}
    window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
    try:
        with _StopRequest() as stop, tqdm(total=t.steps, initial=start, desc="sft", unit="step",
                                          dynamic_ncols=True) as bar:
            if start == 0:
                last.update(evaluator.run(state, 0, writer))
            for step in range(start + 1, t.steps + 1):
                batch = _next_batch(iterator, t.micro_batches)
                data_state = iterator.get_state()
                placed = batch if mesh is None else shard_batch(batch, mesh)
                state, metrics = train_step(state, placed, graphdef=graphdef, tx=tx, settings=settings)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise TrainingDiverged(
                        f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}; stopping with "
                        f"the last good checkpoint at step {max(checkpoints.steps(), default=0)}")
                tokens, squares = _document_tokens(batch["segment_ids"])
                window_tokens += tokens
                window_flops += train_flops_per_token(model_config, squares / max(tokens, 1)) * tokens
                if step % t.log_every == 0 or step == t.steps or stop.signal:
                    elapsed = time.perf_counter() - window_start
                    metrics.update(lr=float(schedule(step - 1)), tokens_per_s=window_tokens / elapsed)
                    if peak:
                        metrics["mfu"] = window_flops / elapsed / (peak * jax.device_count())
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    last = metrics
                    window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                bar.update(1)
                last.update(evaluator.run(state, step, writer))
                checkpoints.save(step, state, data_state, force=bool(stop.signal) or step == t.steps)
                if stop.signal:
                    tqdm.write(f"{stop.signal}: saved a checkpoint at step {step}; exiting")
                    break
    finally:
        checkpoints.close()
        writer.close()
    return last
