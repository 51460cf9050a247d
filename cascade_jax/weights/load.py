"""load_pretrained: an HF NemotronH directory or a converted Orbax checkpoint → a NemotronH module."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    backends: Backends = Backends(), strict: bool = True,
                    mesh: jax.sharding.Mesh | None = None, partition=None) -> NemotronH:
    """Load an HF directory (config.json + safetensors, original `backbone.*` names) or any checkpoint of
    the project's contract (`orbax_params`): a converted checkpoint, a trainer's run directory (its newest
    step that restores) or one step of it. Only parameters and router biases are read, never optimizer state.

    `param_dtype=None` keeps the checkpoint's dtype (A_log, D and the router bias stay fp32 in any case).
    With `strict`, HF tensors the model does not use are an error (`mtp.*` is always ignored).
    With `mesh`, each parameter is placed straight into its NamedSharding and each device reads only
    its own rows (HF) or slices (Orbax); by default the specs come from the logical-axis rules table
    (`cascade_jax.parallel.rules`), and `partition` overrides them (see `placement`).
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_hf(path, dtype, param_dtype, backends, strict, mesh, partition)
    if os.path.isdir(path) and orbax_params.is_checkpoint(path):
        return _load_orbax(path, dtype, param_dtype, backends, mesh, partition)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    raise CheckpointError(f"{path}: neither an HF model directory (config.json + safetensors) nor a cascade_jax "
                          f"checkpoint ({orbax_params.CONFIG_FILE} beside params/ or checkpoints/<step>/state/)")


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
    failure = None
    for record, source in orbax_params.open_params(path):
        graphdef, flat = abstract_state(record["model_config"],
                                        param_dtype or np.dtype(record.get("dtype", "float32")),
                                        dtype=dtype, backends=backends)
        abstract = _abstract_leaves(source, flat, mesh, partition)
        try:
            restored = source.restore(abstract)
        except CheckpointError as e:   # a corrupt or partial step: the one before may restore
            log.warning("%s; trying the step before", e)
            failure = e
            continue
        for param_path, target in flat.items():
            target.set_value(restored[orbax_params.tree_key(param_path)].astype(target.dtype))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
    raise failure


def _abstract_leaves(source, flat, mesh, partition) -> dict:
    """Each wanted leaf as a ShapeDtypeStruct in its target sharding; names and shapes checked first."""
    abstract = {}
    for param_path, target in flat.items():
        key = orbax_params.tree_key(param_path)
        if key not in source.leaves:
            raise CheckpointError(f"{source.directory}: missing parameter {'/'.join(key)}")
        shape, stored_dtype = source.leaves[key]
        if shape != tuple(target.shape):
            raise CheckpointError(f"{source.directory}: parameter {'/'.join(key)} has shape {shape}, "
                                  f"expected {tuple(target.shape)}")
        abstract[key] = jax.ShapeDtypeStruct(shape, stored_dtype,
                                             sharding=param_sharding(mesh, partition, param_path, target))
    return abstract
