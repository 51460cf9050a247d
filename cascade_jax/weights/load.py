"""load_pretrained: an HF NemotronH directory → a NemotronH module with the checkpoint's weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import Backends, NemotronH
from cascade_jax.weights.hf_mapping import hf_rules, hf_shapes, to_jax
from cascade_jax.weights.safetensors_dir import CheckpointError, SafetensorsDir


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    backends: Backends = Backends(), strict: bool = True) -> NemotronH:
    """Load an HF directory (config.json + safetensors, original `backbone.*` names).

    `param_dtype=None` keeps the checkpoint's dtype (A_log, D and the router bias stay fp32 in any case).
    With `strict`, checkpoint tensors the model does not use are an error (`mtp.*` is always ignored).
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: not an HF model directory (no config.json)")
    config = ModelConfig.from_hf(path)
    with SafetensorsDir(path) as checkpoint:
        rules = hf_rules(config)
        if param_dtype is None:
            param_dtype = jnp.dtype(checkpoint.get("backbone.embeddings.weight").dtype)
        abstract = nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                    param_dtype=param_dtype, backends=backends))
        graphdef, state = nnx.split(abstract)
        flat = dict(nnx.to_flat_state(state))
        _check_names(checkpoint, rules, strict)
        for rule in rules:
            target = flat[rule.path]
            expected = hf_shapes(rule, target.shape)
            for name, shape in zip(rule.hf_names, expected):
                if checkpoint.shape(name) != shape:
                    raise CheckpointError(f"{name}: shape {checkpoint.shape(name)}, expected {shape}")
            value = to_jax(rule, [checkpoint.get(n) for n in rule.hf_names])
            target.set_value(jnp.asarray(np.ascontiguousarray(value), dtype=target.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_names(checkpoint: SafetensorsDir, rules, strict: bool) -> None:
    wanted = {name for rule in rules for name in rule.hf_names}
    present = {n for n in checkpoint.names() if not n.startswith("mtp.")}
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(f"{checkpoint.directory}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - wanted)
    if strict and unexpected:
        raise CheckpointError(f"{checkpoint.directory}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
