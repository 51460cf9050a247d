"""HF safetensors directory → Orbax parameter checkpoint, one parameter at a time."""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import numpy as np

from cascade_jax.config import ModelConfig
from cascade_jax.weights.hf_mapping import hf_row_axis, hf_rules, read_jax_block
from cascade_jax.weights.orbax_params import PARAMS_DIR, ParamsWriter, tree_key, write_config
from cascade_jax.weights.placement import row_split_sharding
from cascade_jax.weights.safetensors_dir import SafetensorsDir
from cascade_jax.weights.validate import abstract_state, check_names, check_shapes, checkpoint_dtype, target_dtype
from tools.convert_hf.output import Progress, staged_directory


def convert_to_jax(hf_dir, out_dir, *, dtype=None, overwrite: bool = False, progress: bool = True) -> str:
    """Convert; returns the summary line. `dtype=None` keeps the checkpoint's dtype.

    Each parameter is built as an array split by rows over the host's CPU devices, one device block per
    read, then saved; only the current batch of parameters is ever in memory.
    """
    config = ModelConfig.from_hf(hf_dir)
    rules = hf_rules(config)
    with SafetensorsDir(hf_dir) as checkpoint:
        check_names(checkpoint, rules, strict=True)
        out_dtype = np.dtype(dtype) if dtype is not None else checkpoint_dtype(checkpoint, rules)
        _, flat = abstract_state(config, out_dtype)
        check_shapes(checkpoint, rules, flat)
        sizes = {rule.path: sum(checkpoint.nbytes(n) for n in rule.hf_names) for rule in rules}
        with staged_directory(out_dir, overwrite) as staging, contextlib.closing(
                Progress("to-jax", sum(len(r.hf_names) for r in rules), sum(sizes.values()), progress)) as bar:
            writer = ParamsWriter(staging / PARAMS_DIR)
            for rule in rules:
                shape, cast = tuple(flat[rule.path].shape), target_dtype(rule, out_dtype)
                writer.room_for(math.prod(shape) * cast.itemsize)

                def read_block(index, rule=rule, shape=shape, cast=cast):
                    return np.ascontiguousarray(read_jax_block(rule, checkpoint.read_rows, shape, index), dtype=cast)

                sharding = row_split_sharding(shape, hf_row_axis(rule))
                writer.add(tree_key(rule.path), jax.make_array_from_callback(shape, sharding, read_block))
                bar.advance(len(rule.hf_names), sizes[rule.path])
            writer.finalize()
            write_config(staging, config, out_dtype, generation_config(hf_dir, config))
    return bar.summary(out_dir)


def generation_config(hf_dir, config: ModelConfig) -> dict:
    """The checkpoint's generation_config.json, or one made from the config's special tokens."""
    path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
