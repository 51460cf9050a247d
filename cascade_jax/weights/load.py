"""load_pretrained: an HF NemotronH directory or a converted Orbax checkpoint → a NemotronH module."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import Backends, NemotronH
from cascade_jax.weights import orbax_params
from cascade_jax.weights.hf_mapping import hf_rules, read_jax_block
from cascade_jax.weights.placement import param_sharding
from cascade_jax.weights.safetensors_dir import DTYPES, CheckpointError, SafetensorsDir
from cascade_jax.weights.validate import abstract_state, check_names, check_shapes


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    backends: Backends = Backends(), strict: bool = True,
                    mesh: jax.sharding.Mesh | None = None, partition=None) -> NemotronH:
    """Load an HF directory (config.json + safetensors, original `backbone.*` names) or an Orbax
    checkpoint written by `python -m tools.convert_hf to-jax` (or a trainer; see `orbax_params`).

    `param_dtype=None` keeps the checkpoint's dtype (A_log, D and the router bias stay fp32 in any case).
    With `strict`, HF tensors the model does not use are an error (`mtp.*` is always ignored).
    With `mesh`, each parameter is placed straight into its NamedSharding and each device reads only
    its own rows (HF) or slices (Orbax); `partition` chooses the specs (see `placement`; default replicated).
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_hf(path, dtype, param_dtype, backends, strict, mesh, partition)
    if orbax_params.is_orbax_dir(path):
        return _load_orbax(path, dtype, param_dtype, backends, mesh, partition)
    raise CheckpointError(f"{path}: not an HF model directory (no config.json) nor an Orbax checkpoint")


def _load_hf(path, dtype, param_dtype, backends, strict, mesh, partition) -> NemotronH:
    config = ModelConfig.from_hf(path)
    with SafetensorsDir(path) as checkpoint:
        rules = hf_rules(config)
        check_names(checkpoint, rules, strict)
        if param_dtype is None:
            param_dtype = DTYPES[checkpoint.dtype("backbone.embeddings.weight")]
        graphdef, flat = abstract_state(config, param_dtype, dtype=dtype, backends=backends)
        check_shapes(checkpoint, rules, flat)
        for rule in rules:
            target = flat[rule.path]
            def read_block(index, rule=rule, shape=target.shape, cast=target.dtype):
                return np.ascontiguousarray(read_jax_block(rule, checkpoint.read_rows, shape, index), dtype=cast)

            sharding = param_sharding(mesh, partition, rule.path, target)
            target.set_value(jax.make_array_from_callback(target.shape, sharding, read_block))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _load_orbax(path, dtype, param_dtype, backends, mesh, partition) -> NemotronH:
    record = orbax_params.read_config(path)
    config = record["model_config"]
    source = orbax_params.ParamsSource(path)
    graphdef, flat = abstract_state(config, param_dtype or np.dtype(record.get("dtype", "float32")),
                                    dtype=dtype, backends=backends)
    abstract = {}
    for param_path, target in flat.items():
        key = orbax_params.tree_key(param_path)
        if key not in source.leaves:
            raise CheckpointError(f"{path}: missing parameter {'/'.join(key)}")
        shape, stored_dtype = source.leaves[key]
        if shape != tuple(target.shape):
            raise CheckpointError(f"{path}: parameter {'/'.join(key)} has shape {shape}, expected {tuple(target.shape)}")
        abstract[key] = jax.ShapeDtypeStruct(shape, stored_dtype,
                                             sharding=param_sharding(mesh, partition, param_path, target))
    restored = source.restore(abstract)
    for param_path, target in flat.items():
        target.set_value(restored[orbax_params.tree_key(param_path)].astype(target.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
