"""Lazy access to an HF checkpoint directory (one safetensors file, or shards + index).

We parse the safetensors header ourselves and read tensor bytes with `pread`, instead of memory-mapping
the files: pages of a mapping stay resident (and count in the process RSS) for as long as the file is
open, so reading a 60 GB checkpoint through mmap looks like a 60 GB process. `read_rows` reads a
contiguous block of leading-axis rows, which is what streaming and per-device loading need.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
# Older spellings some NemotronH checkpoints use, mapped to the canonical names.
_ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A bad checkpoint; the message is one line naming the file or tensor."""


def dtype_name(dtype) -> str:
    """numpy dtype → safetensors dtype string (F32, BF16, ...)."""
    for name, np_dtype in DTYPES.items():
        if np.dtype(np_dtype) == np.dtype(dtype):
            return name
    raise CheckpointError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors")


def _canonical(name: str) -> str:
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    return _ALIASES.get(name, name)


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, {raw name: info}); one-line CheckpointError if corrupt or truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"(header length {length} but the file has {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a readable safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    data_start, end = 8 + length, 0
    for name, info in header.items():
        if info.get("dtype") not in DTYPES or len(info.get("data_offsets", ())) != 2:
            raise CheckpointError(f"{path}: not a readable safetensors file (bad header entry for {name})")
        begin, stop = info["data_offsets"]
        if stop - begin != math.prod(info["shape"]) * np.dtype(DTYPES[info["dtype"]]).itemsize:
            raise CheckpointError(f"{path}: not a readable safetensors file ({name}: size does not match shape)")
        end = max(end, stop)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header describes "
                              f"{data_start + end})")
    return data_start, header


class SafetensorsDir:
    """Tensors are read on demand; nothing is loaded until `get` or `read_rows` is called."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._fds: dict[str, int] = {}
        self._entries: dict[str, tuple[str, int, dict]] = {}   # canonical name → (file, data start, info)
        self._raw_name: dict[str, str] = {}
        try:
            for file in self._files():
                path = os.path.join(self.directory, file)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
                data_start, header = read_header(path)
                self._fds[file] = os.open(path, os.O_RDONLY)
                for raw, info in header.items():
                    self._entries[_canonical(raw)] = (file, data_start, info)
                    self._raw_name[_canonical(raw)] = raw
        except BaseException:
            self.close()
            raise

    def _files(self) -> list[str]:
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    return sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no .safetensors files")
        return files

    def names(self) -> set[str]:
        return set(self._entries)

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype string: F32, BF16, ..."""
        return self._entry(name)[2]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, stop = self._entry(name)[2]["data_offsets"]
        return stop - begin

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the leading axis (a 0-d tensor is one row), into `out` if given.

        Reading into a reused `out` spares the page faults of fresh memory, which cost as much as the copy.
        """
        file, data_start, info = self._entry(name)
        shape, dtype = tuple(info["shape"]), np.dtype(DTYPES[info["dtype"]])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        wanted = (stop - start,) + shape[1:] if shape else ()
        if out is None:
            out = np.empty(wanted, dtype)
        elif out.shape != wanted or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{name}: buffer {out.shape} {out.dtype} for rows of {wanted} {dtype}")
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        offset, done = data_start + info["data_offsets"][0] + start * row_bytes, 0
        while done < len(buffer):   # one read returns at most ~2 GiB on Linux
            got = os.preadv(self._fds[file], [buffer[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{file}: truncated while reading {name}")
            done += got
        return out

    def get(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0] if shape else 1)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
