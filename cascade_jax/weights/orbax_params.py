"""Orbax parameter checkpoints: the directory written by `tools.convert_hf to-jax` and read by
`load_pretrained` and `to-hf`.

Layout of a converted checkpoint:

    CKPT_DIR/
      cascade_config.json   {"format": "cascade_jax.params", "model_config": {...ModelConfig fields...},
                             "dtype": "bfloat16", "generation_config": {...}}
      params/               an Orbax PyTree checkpoint (OCDBT + zarr3, uncompressed)

The tree mirrors the NNX state of `NemotronH` as nested dicts with string keys:
`{"layers": {"1": {"mixer": {"up_proj": Array[E, D, F]}}}, "embeddings": {"embedding": ...}, ...}`.

A trainer checkpoint is accepted too (by `to-hf` and `load_pretrained`): any Orbax PyTree directory (the
one holding `_METADATA`, or a folder up to two levels above it) whose tree holds the same parameter tree
under a top-level `params` or `model` key (or at the root). Leaves saved as NNX variables (`.../value`)
are accepted. Its ModelConfig comes from a `cascade_config.json` in the directory or up to two parents.

Writing streams: `tools.convert_hf.to_jax` saves the whole tree in one Orbax call whose leaves are read
from the HF checkpoint block by block (`streamed_save`), so no parameter is ever whole in memory; storage
chunks split each parameter along the HF checkpoint's row axis (one expert per chunk for expert stacks).
`to-hf` reads it back through `ParamsSource.open_leaf` in the same blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np

from cascade_jax.config import ModelConfig
from cascade_jax.weights.safetensors_dir import CheckpointError

CONFIG_FILE = "cascade_config.json"
PARAMS_DIR = "params"
_FORMAT = "cascade_jax.params"
_PARAM_ROOTS = (("params",), ("model",), ())


def tree_key(path: tuple) -> tuple[str, ...]:
    """NNX state path → key of the checkpoint tree (layer indices become strings)."""
    return tuple(str(p) for p in path)


def write_config(directory: str | os.PathLike, config: ModelConfig, dtype, generation_config: dict) -> None:
    record = {"format": _FORMAT, "model_config": dataclasses.asdict(config),
              "dtype": np.dtype(dtype).name, "generation_config": generation_config}
    Path(directory, CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_config(directory: str | os.PathLike) -> dict:
    """The cascade_config.json of `directory` or of up to two parents (trainer step folders)."""
    for folder in [Path(directory), *list(Path(directory).resolve().parents)[:2]]:
        file = folder / CONFIG_FILE
        if file.is_file():
            try:
                record = json.loads(file.read_text())
                record["model_config"] = ModelConfig(**record["model_config"])
                return record
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{file}: not a valid {CONFIG_FILE} ({e})") from None
    raise CheckpointError(f"{directory}: no {CONFIG_FILE} here or in the two folders above")


def is_orbax_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file() or bool(_pytree_dirs(Path(directory)))


def _pytree_dirs(root: Path) -> list[Path]:
    found = [root] if (root / "_METADATA").is_file() else []
    for depth_pattern in ("*", "*/*"):
        found += sorted(p.parent for p in root.glob(f"{depth_pattern}/_METADATA"))
    return found


class ParamsSource:
    """Parameter leaves of an Orbax checkpoint: shapes and dtypes from metadata, values on request."""

    def __init__(self, directory: str | os.PathLike):
        import orbax.checkpoint as ocp

        self.directory = os.fspath(directory)
        self._checkpointer = ocp.PyTreeCheckpointer()
        self._ts_context = None
        candidates = _pytree_dirs(Path(directory))
        if not candidates:
            raise CheckpointError(f"{directory}: not an Orbax checkpoint (no _METADATA within two levels)")
        for candidate in candidates:
            leaves = self._leaves(candidate)
            for root in _PARAM_ROOTS:
                params = {k[len(root):]: v for k, v in leaves.items() if k[:len(root)] == root}
                params = {(k[:-1] if k[-1] == "value" else k): v for k, v in params.items()}
                if ("embeddings", "embedding") in params:
                    self.pytree_dir, self._root, self.leaves = candidate, root, params
                    self._value_suffix = any(k[-1] == "value" for k in leaves)
                    return
        raise CheckpointError(f"{directory}: no parameter tree (embeddings/embedding under params, model or the root)")

    def _leaves(self, pytree_dir: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        try:
            metadata = self._checkpointer.metadata(pytree_dir).item_metadata
            tree, self._use_zarr3 = metadata.tree, metadata.use_zarr3
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise CheckpointError(f"{pytree_dir}: unreadable Orbax metadata ({type(e).__name__})") from None
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {tuple(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
                for path, leaf in flat if hasattr(leaf, "shape")}

    def open_leaf(self, key: tuple[str, ...]):
        """A TensorStore of one leaf, for reading slices of it (the spec Orbax itself reads with)."""
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath

        name = ".".join(self._full_key(key))
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.pytree_dir),
                                           use_zarr3=self._use_zarr3)
        use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.pytree_dir))
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        if self._ts_context is None:   # one context: leaves share the OCDBT B-tree cache
            self._ts_context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
        try:
            return ts.open(spec, open=True, read=True, context=self._ts_context).result()
        except Exception as e:
            raise CheckpointError(f"{self.pytree_dir}: cannot read {'/'.join(key)} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def _full_key(self, key: tuple[str, ...]) -> tuple[str, ...]:
        return self._root + key + (("value",) if self._value_suffix else ())

    def restore(self, abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct]) -> dict[tuple[str, ...], jax.Array]:
        """Read the given leaves (each with its target sharding); Orbax reads only each device's slices."""
        import orbax.checkpoint as ocp

        item, full_keys = {}, {}
        for key, leaf in abstract.items():
            full = self._full_key(key)
            full_keys[key] = full
            node = item
            for part in full[:-1]:
                node = node.setdefault(part, {})
            node[full[-1]] = leaf
        try:
            restored = self._checkpointer.restore(self.pytree_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        except Exception as e:
            raise CheckpointError(f"{self.pytree_dir}: cannot read {'/'.join(next(iter(abstract)))} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return {key: _lookup(restored, full) for key, full in full_keys.items()}


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _lookup(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree
