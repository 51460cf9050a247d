"""Checks of a checkpoint against the model it must fill: names, shapes, dtypes (one-line errors)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.weights.hf_mapping import TensorRule, hf_shapes
from cascade_jax.weights.safetensors_dir import DTYPES, CheckpointError, SafetensorsDir

FLOAT_DTYPES = ("F32", "BF16", "F16")


def abstract_state(config: ModelConfig, param_dtype=jnp.float32, **model_kwargs):
    """(graphdef, {path: abstract Variable}) of a NemotronH, without allocating parameters."""
    from cascade_jax.model.nemotron_h import NemotronH  # the model imports ops; keep this module light

    abstract = nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, **model_kwargs))
    graphdef, state = nnx.split(abstract)
    return graphdef, dict(nnx.to_flat_state(state))


def _first_of(problem: str, where: str, names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{where}: {problem} {names[0]}{more}"


def check_names(checkpoint: SafetensorsDir, rules: list[TensorRule], strict: bool = True) -> None:
    """Every tensor the rules need is present; with `strict`, nothing else is (`mtp.*` is ignored)."""
    wanted = {name for rule in rules for name in rule.hf_names}
    present = {n for n in checkpoint.names() if not n.startswith("mtp.")}
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(_first_of("missing tensor", checkpoint.directory, missing))
    unexpected = sorted(present - wanted)
    if strict and unexpected:
        raise CheckpointError(_first_of("unexpected tensor", checkpoint.directory, unexpected))


def check_shapes(checkpoint: SafetensorsDir, rules: list[TensorRule], flat_state: dict) -> None:
    for rule in rules:
        for name, shape in zip(rule.hf_names, hf_shapes(rule, flat_state[rule.path].shape)):
            if checkpoint.shape(name) != shape:
                raise CheckpointError(f"{name}: shape {checkpoint.shape(name)}, expected {shape}")


def checkpoint_dtype(checkpoint: SafetensorsDir, rules: list[TensorRule]) -> np.dtype:
    """The one dtype of all tensors but A_log, D and the router bias, which must be F32.

    Mixed dtypes would not survive a round trip (we store one array per parameter), so they are an error.
    """
    main = checkpoint.dtype("backbone.embeddings.weight")
    if main not in FLOAT_DTYPES:
        raise CheckpointError(f"backbone.embeddings.weight: dtype {main}, expected one of {list(FLOAT_DTYPES)}")
    for rule in rules:
        expected = "F32" if rule.keeps_fp32 else main
        for name in rule.hf_names:
            if checkpoint.dtype(name) != expected:
                raise CheckpointError(f"{name}: dtype {checkpoint.dtype(name)}, expected {expected}")
    return np.dtype(DTYPES[main])


def target_dtype(rule: TensorRule, dtype) -> np.dtype:
    """fp32 for A_log, D and the router bias whatever the model dtype."""
    return np.dtype(np.float32) if rule.keeps_fp32 else np.dtype(dtype)
