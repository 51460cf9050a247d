"""What every trainer does before its loop: build the model (from a preset, an HF directory or a checkpoint),
its train state (on one device or already sharded), check a resume against the recorded config, and the
run record (config.yaml, cascade_config.json) that makes the run directory a checkpoint.

`cfg` is a run config (`SFTConfig`, `RLConfig`): these read `run_dir`, `resume`, `allow_config_change`,
`model` (a `ModelSection`), `train.seed` and `train.steps`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import NemotronH
from cascade_jax.train.config import RunConfigError, math_changes, to_yaml
from cascade_jax.train.loop import read_complete
from cascade_jax.train.state import init_sharded_train_state, init_train_state, shard_train_state
from cascade_jax.weights import orbax_params
from cascade_jax.weights.load import load_pretrained


def build_model(cfg, seed: int, mesh: jax.sharding.Mesh | None = None) -> NemotronH:
    """The run's model from `cfg.model` (a `ModelSection`). With `mesh`, pretrained weights are read straight into their rule shardings."""
    m = cfg.model
    kwargs = dict(dtype=jnp.dtype(m.dtype), backends=m.backends)
    if m.from_pretrained:
        model = load_pretrained(m.from_pretrained, param_dtype=jnp.dtype(m.param_dtype), mesh=mesh, **kwargs)
        model.remat = m.remat
        return model
    config = ModelConfig.preset(m.preset).replace(**m.overrides)
    return NemotronH(config, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(m.param_dtype), remat=m.remat, **kwargs)


def initial_state(cfg, tx, mesh):
    """(graphdef, TrainState, ModelConfig): on one device, or created already sharded."""
    seed = cfg.train.seed
    if mesh is None:
        model = build_model(cfg, seed)
        return (*init_train_state(model, tx, seed), model.config)
    if cfg.model.from_pretrained:
        model = build_model(cfg, seed, mesh)
        return (*shard_train_state(model, tx, seed, mesh), model.config)
    graphdef, state = init_sharded_train_state(lambda: build_model(cfg, seed), tx, seed, mesh)
    return graphdef, state, nnx.merge(graphdef, state.params, state.expert_bias).config


def check_resume(cfg) -> dict | None:
    """Before anything is built: refuse a resume whose config changes the math (unless allowed), and say
    whether the run is already complete. Returns the complete.json record of a finished run, else None."""
    checkpoints = os.path.join(cfg.run_dir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return None
    if not cfg.resume:
        raise RunConfigError(f"{cfg.run_dir}: holds checkpoints of an earlier run; resume it (drop --no-resume), "
                             f"or choose a new run_dir")
    recorded = os.path.join(cfg.run_dir, "config.yaml")
    if os.path.isfile(recorded):
        with open(recorded) as f:
            changes = math_changes(f.read(), cfg)
        if changes and not cfg.allow_config_change:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise RunConfigError(f"{cfg.run_dir}: resuming with a config that changes the math ({listed}); rerun "
                                 f"with the run's config.yaml, pass --allow-config-change, or use a new run_dir")
        if changes:
            _record_changes(cfg, changes)
    complete = read_complete(cfg.run_dir)
    return complete if complete is not None and complete["steps"] == cfg.train.steps else None


def _record_changes(cfg, changes: dict) -> None:
    if jax.process_index() != 0:
        return
    with open(os.path.join(cfg.run_dir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps({"changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))


def run_record(cfg, model_config: ModelConfig) -> dict[str, str]:
    """config.yaml and cascade_config.json, written when the run has its first batch."""
    generation = orbax_params.default_generation_config(model_config)
    if cfg.model.from_pretrained:
        source = os.path.join(cfg.model.from_pretrained, "generation_config.json")
        if os.path.isfile(source):
            with open(source) as f:
                generation = json.load(f)
        elif orbax_params.is_checkpoint(cfg.model.from_pretrained):
            generation = orbax_params.read_config(cfg.model.from_pretrained).get("generation_config") or generation
    return {"config.yaml": to_yaml(cfg),
            orbax_params.CONFIG_FILE: orbax_params.config_text(model_config, cfg.model.param_dtype, generation)}
