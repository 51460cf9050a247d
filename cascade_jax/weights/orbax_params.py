"""Orbax parameter checkpoints: the one contract between the trainers, `load_pretrained`, `to-hf` and a
later stage's starting point.

Every checkpoint names its model in one file, `cascade_config.json`:
`{"format": "cascade_jax.params", "model_config": {...ModelConfig fields...}, "dtype": "float32",
"generation_config": {...}}`. Two layouts hold the parameters:

    converted (tools.convert_hf to-jax)      run directory (cascade-sft, cascade-rl)
      CKPT/cascade_config.json                 RUN/cascade_config.json
      CKPT/params/   Orbax tree of the          RUN/config.yaml              the run's full config
                     NNX parameter state        RUN/checkpoints/<step>/state  Orbax TrainState: params,
                                                                              expert_bias, opt_state, step, rng
                                                RUN/checkpoints/<step>/data   data-iterator state (JSON)
                                                RUN/metrics.jsonl, RUN/tensorboard/

A reader accepts CKPT, RUN (its newest step that restores), RUN/checkpoints, RUN/checkpoints/<step> or that
step's state/. In a TrainState the router correction biases live in `expert_bias` (they are updated by load
balancing, not by gradients) beside `params`; both are read, the optimizer state never is. Trees are
nested dicts with string keys mirroring the NNX state of `NemotronH`
(`{"layers": {"1": {"mixer": {"up_proj": ...}}}}`); leaves saved as NNX variables (`.../value`) and a
parameter tree under `model` or at the root are accepted too.

Writing streams: `tools.convert_hf.to_jax` saves the whole tree in one Orbax call whose leaves are read
from the HF checkpoint block by block (`streamed_save`), so no parameter is ever whole in memory; storage
chunks split each parameter along the HF checkpoint's row axis (one expert per chunk for expert stacks).
`to-hf` reads it back through `ParamsSource.open_leaf` in the same blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from cascade_jax.config import ModelConfig
from cascade_jax.weights.safetensors_dir import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "cascade_config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"
_FORMAT = "cascade_jax.params"
# Where the parameter tree sits in a checkpoint's tree, tried in order: a TrainState (router biases
# beside the parameters), a tree under `model`, the root (a converted checkpoint).
_PARAM_LAYOUTS = ((("params",), ("expert_bias",)), (("model",),), ((),))


@contextlib.contextmanager
def _quiet_absl():
    """Orbax warns through absl that a tree inside a step has no step-level metadata file: true and
    harmless for every trainer checkpoint, and alarming on each load."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tree_key(path: tuple) -> tuple[str, ...]:
    """NNX state path → key of the checkpoint tree (layer indices become strings)."""
    return tuple(str(p) for p in path)


def default_generation_config(config: ModelConfig) -> dict:
    """What a checkpoint without its own generation_config.json generates with: the config's special tokens."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}


def config_text(config: ModelConfig, dtype, generation_config: dict) -> str:
    """The cascade_config.json of a checkpoint whose parameters are stored in `dtype`."""
    model_config = dataclasses.asdict(config)
    model_config["time_step_limit"] = [_json_float(v) for v in config.time_step_limit]
    record = {"format": _FORMAT, "model_config": model_config, "dtype": np.dtype(dtype).name,
              "generation_config": generation_config}
    return json.dumps(record, indent=2, allow_nan=False) + "\n"


def _json_float(value: float) -> float | str:
    """Strict JSON has no Infinity: write "inf" (read back by `float`)."""
    return value if np.isfinite(value) else str(value)


def write_config(directory: str | os.PathLike, config: ModelConfig, dtype, generation_config: dict) -> None:
    Path(directory, CONFIG_FILE).write_text(config_text(config, dtype, generation_config))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint path resolved: its cascade_config.json record and the Orbax trees that may hold its
    parameters, newest first (a run directory lists every step; the first that restores is used)."""

    path: Path
    config_file: Path
    pytree_dirs: tuple[Path, ...]

    def read_config(self) -> dict:
        try:
            record = json.loads(self.config_file.read_text())
            model_config = dict(record["model_config"])
            if isinstance(model_config.get("time_step_limit"), list):
                model_config["time_step_limit"] = tuple(float(v) for v in model_config["time_step_limit"])
            record["model_config"] = ModelConfig(**model_config)
            return record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.config_file}: not a valid {CONFIG_FILE} ({e})") from None


def locate(path: str | os.PathLike) -> Checkpoint:
    """Resolve any path the contract accepts (see the module docstring); one-line CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if (path / CHECKPOINTS_DIR).is_dir():                                      # RUN
        return _in_run(path, path, _step_dirs(path / CHECKPOINTS_DIR))
    if _step_dirs(path):                                                       # RUN/checkpoints
        return _in_run(path, path.parent, _step_dirs(path))
    if path.name.isdigit() and (path / STATE_DIR / "_METADATA").is_file():    # RUN/checkpoints/<step>
        return _in_run(path, path.parent.parent, [path])
    if path.name == STATE_DIR and (path / "_METADATA").is_file() and path.parent.name.isdigit():
        return _in_run(path, path.parent.parent.parent, [path.parent])          # RUN/checkpoints/<step>/state
    if (path / PARAMS_DIR / "_METADATA").is_file():                           # CKPT
        return Checkpoint(path, _config_file(path, path), (path / PARAMS_DIR,))
    if (path / "_METADATA").is_file():                                         # any Orbax tree beside a config
        home = next((p for p in (path, path.parent) if (p / CONFIG_FILE).is_file()), path)
        return Checkpoint(path, _config_file(path, home), (path,))
    raise CheckpointError(f"{path}: not a checkpoint (expected {CONFIG_FILE} with {PARAMS_DIR}/, or a run "
                          f"directory with {CHECKPOINTS_DIR}/<step>/{STATE_DIR}/)")


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        locate(path)
        return True
    except CheckpointError:
        return False


def _step_dirs(folder: Path) -> list[Path]:
    """Finished steps (Orbax renames a step into place when it is complete), newest first."""
    steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def _in_run(path: Path, run_dir: Path, steps: list[Path]) -> Checkpoint:
    trees = tuple(s / STATE_DIR for s in steps if (s / STATE_DIR / "_METADATA").is_file())
    if not trees:
        raise CheckpointError(f"{path}: a run directory with no finished checkpoint yet "
                              f"(nothing in {run_dir / CHECKPOINTS_DIR})")
    return Checkpoint(path, _config_file(path, run_dir), trees)


def _config_file(path: Path, home: Path) -> Path:
    file = home / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} in {home}")
    return file


def open_params(path: str | os.PathLike) -> Iterator[tuple[dict, ParamsSource]]:
    """(config record, parameter source) for each Orbax tree of a checkpoint path, newest first. A tree
    whose metadata does not read is reported and skipped; the caller stops at the first it can use."""
    checkpoint = locate(path)
    record = checkpoint.read_config()
    for tree in checkpoint.pytree_dirs:
        try:
            source = ParamsSource(tree)
        except CheckpointError as e:
            if len(checkpoint.pytree_dirs) == 1:
                raise
            log.warning("%s; trying the step before", e)
            continue
        yield record, source
    if len(checkpoint.pytree_dirs) > 1:
        raise CheckpointError(f"{path}: none of its {len(checkpoint.pytree_dirs)} checkpoints is readable")


def read_config(path: str | os.PathLike) -> dict:
    """The cascade_config.json record of any checkpoint path, its `model_config` as a ModelConfig."""
    return locate(path).read_config()


class ParamsSource:
    """Parameter leaves of an Orbax checkpoint: shapes and dtypes from metadata, values on request."""

    def __init__(self, pytree_dir: str | os.PathLike):
        """`pytree_dir`: one Orbax tree, e.g. an entry of `locate(path).pytree_dirs`."""
        import orbax.checkpoint as ocp

        # Orbax finds no item metadata under a relative path (0.12.8: `metadata().item_metadata` is None)
        self.pytree_dir = Path(pytree_dir).absolute()
        self.directory = os.fspath(pytree_dir)
        self._checkpointer = ocp.PyTreeCheckpointer()
        self._ts_context = None
        leaves = self._leaves(self.pytree_dir)
        for layout in _PARAM_LAYOUTS:
            found = {}   # parameter key → (shape, dtype), full key in the tree
            for root in layout:
                for key, leaf in leaves.items():
                    if key[:len(root)] == root:
                        name = key[len(root):-1] if key[-1] == "value" else key[len(root):]
                        found[name] = (leaf, key)
            if ("embeddings", "embedding") in found:
                self.leaves = {k: leaf for k, (leaf, _) in found.items()}
                self._full_keys = {k: full for k, (_, full) in found.items()}
                return
        raise CheckpointError(f"{pytree_dir}: no parameter tree (embeddings/embedding under params, model or the root)")

    def _leaves(self, pytree_dir: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        try:
            with _quiet_absl():
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
        return self._full_keys[key]

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
