"""Orbax parameter checkpoint (converted or trained) → HF directory with the original tensor names."""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np

from cascade_jax.weights.hf_mapping import hf_row_axis, hf_rules, hf_shapes, to_hf
from cascade_jax.weights.orbax_params import ParamsSource, read_config, tree_key
from cascade_jax.weights.placement import blocks_in_order, row_split_sharding
from cascade_jax.weights.safetensors_dir import CheckpointError, dtype_name
from cascade_jax.weights.safetensors_writer import ShardedSafetensorsWriter, TensorEntry
from cascade_jax.weights.validate import abstract_state, target_dtype
from tools.convert_hf.output import Progress, staged_directory


def convert_to_hf(ckpt_dir, out_dir, *, max_shard_bytes: int = 5 * 10**9, dtype=None,
                  overwrite: bool = False, progress: bool = True) -> str:
    """Convert; returns the summary line. `dtype=None` keeps the checkpoint's parameter dtype
    (A_log, D and e_score_correction_bias are always written as F32)."""
    record = read_config(ckpt_dir)
    config = record["model_config"]
    source = ParamsSource(ckpt_dir)
    rules = hf_rules(config)
    _, flat = abstract_state(config)
    _check_leaves(source, rules, flat)
    out_dtype = np.dtype(dtype) if dtype is not None else source.leaves[("embeddings", "embedding")][1]
    entries = [TensorEntry(name, dtype_name(target_dtype(rule, out_dtype)), shape)
               for rule in rules
               for name, shape in zip(rule.hf_names, hf_shapes(rule, source.leaves[tree_key(rule.path)][0]))]
    with staged_directory(out_dir, overwrite) as staging, contextlib.closing(
            Progress("to-hf", len(entries), sum(e.nbytes for e in entries), progress)) as bar:
        writer = ShardedSafetensorsWriter(staging, entries, max_shard_bytes)
        for rule in rules:
            nbytes = _write_rule(source, rule, writer, target_dtype(rule, out_dtype))
            bar.advance(len(rule.hf_names), nbytes)
        writer.close()
        hf_config = config.to_hf() | {"dtype": out_dtype.name, "torch_dtype": out_dtype.name}
        _write_json(staging / "config.json", hf_config)
        _write_json(staging / "generation_config.json", record.get("generation_config") or {})
    return bar.summary(out_dir)


def _write_rule(source: ParamsSource, rule, writer: ShardedSafetensorsWriter, cast: np.dtype) -> int:
    """Read one parameter (split by HF rows over the CPU devices) and append its HF tensors."""
    key, axis = tree_key(rule.path), hf_row_axis(rule)
    shape, stored = source.leaves[key]
    sharding = row_split_sharding(shape, axis)
    array = source.restore({key: jax.ShapeDtypeStruct(shape, stored, sharding=sharding)})[key]
    written = 0
    for start, block in blocks_in_order(array, axis):
        if rule.transform == "experts":
            for offset, expert in enumerate(block):
                writer.write(rule.hf_names[start + offset], expert.T.astype(cast, copy=False))
        else:
            writer.write(rule.hf_names[0], to_hf(rule, block)[0].astype(cast, copy=False))
        written += block.size * cast.itemsize
    return written


def _check_leaves(source: ParamsSource, rules, flat) -> None:
    where = source.directory
    wanted = {tree_key(rule.path): rule for rule in rules}
    missing = sorted(set(wanted) - set(source.leaves))
    if missing:
        raise CheckpointError(f"{where}: missing parameter {'/'.join(missing[0])}")
    unexpected = sorted(set(source.leaves) - set(wanted))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected parameter {'/'.join(unexpected[0])}")
    main_dtype = source.leaves[("embeddings", "embedding")][1]
    if main_dtype.kind != "f" and main_dtype.name != "bfloat16":
        raise CheckpointError(f"{where}: parameter embeddings/embedding has dtype {main_dtype}, expected a float type")
    for key, rule in wanted.items():
        shape, stored = source.leaves[key]
        expected_shape = tuple(flat[rule.path].shape)
        if shape != expected_shape:
            raise CheckpointError(f"{where}: parameter {'/'.join(key)} has shape {shape}, expected {expected_shape}")
        expected_dtype = np.dtype(np.float32) if rule.keeps_fp32 else main_dtype
        if stored != expected_dtype:
            raise CheckpointError(f"{where}: parameter {'/'.join(key)} has dtype {stored}, expected {expected_dtype}")


def _write_json(path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
