"""Orbax parameter checkpoint (converted or trained) → HF directory with the original tensor names."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math

import numpy as np
import tensorstore as ts

from cascade_jax.config import hf_json_text
from cascade_jax.weights.hf_mapping import copy_into, hf_row_axis, hf_rules, hf_shapes, to_hf
from cascade_jax.weights.orbax_params import CHECKPOINTS_DIR, ParamsSource, locate, open_params, tree_key
from cascade_jax.weights.safetensors_dir import CheckpointError, dtype_name
from cascade_jax.weights.safetensors_writer import ShardedSafetensorsWriter, TensorEntry
from cascade_jax.weights.streamed_save import BLOCK_BYTES, block_ranges
from cascade_jax.weights.validate import abstract_state, target_dtype
from tools.convert_hf.output import Progress, input_dirs, refuse_overlap, staged_directory

BLOCKS_IN_FLIGHT = 3   # blocks read and transposed ahead while the caller writes


def convert_to_hf(ckpt_dir, out_dir, *, max_shard_bytes: int = 5 * 10**9, dtype=None,
                  overwrite: bool = False, progress: bool = True) -> str:
    """Convert; returns the summary line. `dtype=None` keeps the checkpoint's parameter dtype
    (A_log, D and e_score_correction_bias are always written as F32). `out_dir` may not overlap the
    checkpoint path nor the run directory it belongs to."""
    refuse_overlap(out_dir, input_dirs("--ckpt", ckpt_dir))
    home = locate(ckpt_dir).config_file.parent   # RUN for any path inside a run directory
    kind = "run directory" if (home / CHECKPOINTS_DIR).is_dir() else "checkpoint directory"
    refuse_overlap(out_dir, [(f"the {kind} {home} of the input --ckpt {ckpt_dir}", home)])
    record, source = next(open_params(ckpt_dir))   # a run directory: its newest readable step
    config = record["model_config"]
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
        for rule, (start, stop, rows), tensors in _hf_blocks(source, rules, out_dtype):
            experts = rule.transform == "experts"
            for name, tensor in zip(rule.hf_names[start:stop] if experts else rule.hf_names, tensors):
                writer.write(name, tensor)
                bar.advance(int(experts or stop == rows), tensor.nbytes)
        writer.close()
        hf_config = config.to_hf() | {"dtype": out_dtype.name, "torch_dtype": out_dtype.name}
        (staging / "config.json").write_text(hf_json_text(hf_config))
        (staging / "generation_config.json").write_text(hf_json_text(record.get("generation_config") or {}))
    return bar.summary(out_dir)


def _hf_blocks(source: ParamsSource, rules, out_dtype: np.dtype):
    """(rule, (start, stop, rows), HF tensors) for every block of every parameter, in order, split along
    the HF row axis. A thread pool reads and transposes BLOCKS_IN_FLIGHT blocks ahead while the caller
    writes; each block has a slot of buffers that is reused once the caller is done with the block
    (fresh pages for every block would cost as much as the copies)."""
    slots = [_Slot() for _ in range(BLOCKS_IN_FLIGHT + 1)]
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="to-hf-read") as pool:
        for i, (rule, store, dtype, span) in enumerate(_plan(source, rules)):
            if len(pending) == BLOCKS_IN_FLIGHT:
                yield _finished(source, *pending.popleft())
            cast = target_dtype(rule, out_dtype)
            pending.append((rule, span, pool.submit(slots[i % len(slots)].load, rule, store, dtype, span, cast)))
        while pending:
            yield _finished(source, *pending.popleft())


class _Slot:
    """The buffers one block in flight is read into (our layout) and converted into (HF layout)."""

    def __init__(self):
        self.block, self.hf = np.empty(0, np.uint8), np.empty(0, np.uint8)

    def load(self, rule, store, dtype: np.dtype, span, cast: np.dtype) -> list[np.ndarray]:
        axis, (start, stop, _) = hf_row_axis(rule), span
        shape = tuple(stop - start if a == axis else n for a, n in enumerate(store.shape))
        self.block = _grown(self.block, math.prod(shape) * dtype.itemsize)
        block = self.block[:math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        index = tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(shape)))
        ts.array(block, copy=False, write=True).write(store[index]).result()
        views = to_hf(rule, block)
        if len(views) == 1 and views[0].dtype == cast and views[0].flags.c_contiguous:
            return views   # a plain copy: the block already is the HF rows
        self.hf = _grown(self.hf, sum(v.size for v in views) * cast.itemsize)
        out, offset = [], 0
        for view in views:
            nbytes = view.size * cast.itemsize
            out.append(self.hf[offset:offset + nbytes].view(cast).reshape(view.shape))
            copy_into(out[-1], view)
            offset += nbytes
        return out


def _plan(source: ParamsSource, rules):
    """(rule, store, dtype, (start, stop, rows)) for each block: whole storage chunks of about BLOCK_BYTES."""
    for rule in rules:
        key, axis = tree_key(rule.path), hf_row_axis(rule)
        store, (shape, dtype) = source.open_leaf(key), source.leaves[key]
        rows = shape[axis] if shape else 1
        chunk_rows = store.chunk_layout.read_chunk.shape[axis] if shape else 1
        for start, stop in block_ranges(rows, math.prod(shape) * dtype.itemsize // max(rows, 1), chunk_rows):
            yield rule, store, dtype, (start, stop, rows)


def _finished(source: ParamsSource, rule, span, loading):
    try:
        return rule, span, loading.result()
    except Exception as e:  # TensorStore reports corrupt or missing chunks as several exception types
        raise CheckpointError(f"{source.pytree_dir}: cannot read {'/'.join(tree_key(rule.path))} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _grown(buffer: np.ndarray, nbytes: int) -> np.ndarray:
    return buffer if buffer.size >= nbytes else np.empty(max(nbytes, BLOCK_BYTES), np.uint8)


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
