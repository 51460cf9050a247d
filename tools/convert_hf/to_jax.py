"""HF safetensors directory → Orbax parameter checkpoint, streamed block by block."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading

import numpy as np

from cascade_jax.config import ModelConfig
from cascade_jax.weights.hf_mapping import TensorRule, fill_jax_rows, hf_row_axis, hf_rules
from cascade_jax.weights.orbax_params import PARAMS_DIR, default_generation_config, tree_key, write_config
from cascade_jax.weights.safetensors_dir import DTYPES, SafetensorsDir
from cascade_jax.weights.streamed_save import StreamedArray, save_streamed
from cascade_jax.weights.validate import abstract_state, check_names, check_shapes, checkpoint_dtype, target_dtype
from tools.convert_hf.output import Progress, input_dirs, refuse_overlap, staged_directory


def convert_to_jax(hf_dir, out_dir, *, dtype=None, overwrite: bool = False, progress: bool = True) -> str:
    """Convert; returns the summary line. `dtype=None` keeps the checkpoint's dtype.

    One Orbax save of the whole tree, each parameter read from the checkpoint a block of HF rows at a
    time while earlier blocks are written (see `streamed_save`); memory holds a few blocks, not a layer.
    """
    refuse_overlap(out_dir, input_dirs("--hf", hf_dir))
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
            tree = {}
            for rule in rules:
                leaf = _streamed(checkpoint, rule, tuple(flat[rule.path].shape), target_dtype(rule, out_dtype),
                                 sizes[rule.path], bar)
                _insert(tree, tree_key(rule.path), leaf)
            save_streamed(staging / PARAMS_DIR, tree)
            write_config(staging, config, out_dtype, generation_config(hf_dir, config))
    return bar.summary(out_dir)


def _streamed(checkpoint: SafetensorsDir, rule: TensorRule, shape: tuple[int, ...], cast: np.dtype,
              hf_bytes: int, bar: Progress) -> StreamedArray:
    axis = hf_row_axis(rule)
    rows = shape[axis] if shape else 1

    def read(start, stop, out):
        fill_jax_rows(rule, _scratch_reader(checkpoint), start, stop, out)

    def written(start, stop):
        tensors = stop - start if rule.transform == "experts" else int(stop == rows)
        bar.advance(tensors, hf_bytes // rows * (stop - start))

    return StreamedArray(shape, cast, axis, read, written)


_scratch = threading.local()


def _scratch_reader(checkpoint: SafetensorsDir):
    """`read_rows` into a buffer this thread reuses (fresh pages per read cost as much as the copy)."""
    def read_rows(name, start, stop):
        shape = checkpoint.shape(name)
        rows = (stop - start,) + shape[1:] if shape else ()
        dtype = np.dtype(DTYPES[checkpoint.dtype(name)])
        nbytes = math.prod(rows) * dtype.itemsize
        if getattr(_scratch, "buffer", np.empty(0, np.uint8)).size < nbytes:
            _scratch.buffer = np.empty(nbytes, np.uint8)
        return checkpoint.read_rows(name, start, stop, out=_scratch.buffer[:nbytes].view(dtype).reshape(rows))

    return read_rows


def _insert(tree: dict, key: tuple[str, ...], leaf) -> None:
    for part in key[:-1]:
        tree = tree.setdefault(part, {})
    tree[key[-1]] = leaf


def generation_config(hf_dir, config: ModelConfig) -> dict:
    """The checkpoint's generation_config.json, or one made from the config's special tokens."""
    path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return default_generation_config(config)
