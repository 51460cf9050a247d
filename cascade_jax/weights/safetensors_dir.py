"""Lazy, memory-mapped access to an HF checkpoint directory (one safetensors file, or shards + index)."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
# Older spellings some NemotronH checkpoints use, mapped to the canonical names.
_ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


class CheckpointError(ValueError):
    """A bad checkpoint; the message is one line naming the file or tensor."""


def _canonical(name: str) -> str:
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    return _ALIASES.get(name, name)


class SafetensorsDir:
    """Tensors are read on demand; nothing is loaded until `get` is called."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        files = self._files()
        self._stack = ExitStack()
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._raw_name: dict[str, str] = {}
        for file in files:
            path = os.path.join(self.directory, file)
            try:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # safetensors raises several types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[file] = handle
            for raw in handle.keys():
                self._file_of[_canonical(raw)] = file
                self._raw_name[_canonical(raw)] = raw

    def _files(self) -> list[str]:
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no .safetensors files")
        return files

    def names(self) -> set[str]:
        return set(self._file_of)

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        return self._handles[self._file_of[name]].get_slice(self._raw_name[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        try:
            return self._handles[self._file_of[name]].get_tensor(self._raw_name[name])
        except Exception as e:
            raise CheckpointError(f"{self._file_of[name]}: cannot read {name} ({e})") from None

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
