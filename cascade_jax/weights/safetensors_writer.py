"""Streaming safetensors writer: a shard plan fixed up front, then bytes appended tensor by tensor.

Each file's header must list every tensor's offsets before the data, so the caller declares all tensors
(name, dtype, shape) first; then `write` appends blocks of rows in declaration order. Nothing but the
block being written is held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from cascade_jax.weights.safetensors_dir import DTYPES, INDEX_FILE


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str          # safetensors dtype string: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(DTYPES[self.dtype]).itemsize


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    shards, size = [[]], 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(entries: list[TensorEntry]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the format pads the header so the data section is 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardedSafetensorsWriter:
    def __init__(self, directory: str | os.PathLike, entries: list[TensorEntry], max_shard_bytes: int):
        self.directory = os.fspath(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self._queue = [(file, entry) for file, shard in zip(self.files, self.shards) for entry in shard]
        self._position, self._written, self._handle, self._open_file = 0, 0, None, None

    def write(self, name: str, block: np.ndarray) -> None:
        """Append `block` (rows of tensor `name`, already in its final dtype) to the output."""
        file, entry = self._queue[self._position]
        if name != entry.name or np.dtype(block.dtype) != np.dtype(DTYPES[entry.dtype]):
            raise ValueError(f"expected a block of {entry.name} ({entry.dtype}), got {name} ({block.dtype})")
        if file != self._open_file:
            self._open(file)
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        self._handle.write(data.data)
        self._written += data.size
        if self._written > entry.nbytes:
            raise ValueError(f"{name}: {self._written} bytes written, {entry.nbytes} expected")
        if self._written == entry.nbytes:
            self._position, self._written = self._position + 1, 0

    def _open(self, file: str) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._open_file = open(os.path.join(self.directory, file), "wb"), file
        self._handle.write(_header_bytes(self.shards[self.files.index(file)]))

    def close(self) -> None:
        """Finish the last file and write the index (for more than one file)."""
        if self._position != len(self._queue):
            raise ValueError(f"{self._queue[self._position][1].name}: not written")
        if self._handle is not None:
            self._handle.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, e in self._queue)},
                     "weight_map": {e.name: file for file, e in self._queue}}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
