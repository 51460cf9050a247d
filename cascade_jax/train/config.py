"""SFT run configuration: YAML files into typed dataclasses, with dotted command-line overrides.

    cfg = load_sft_config("configs/sft/tiny.yaml", ["optimizer.lr=3e-6", "train.steps=20"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade_jax.data.config import ASSETS, DataConfig
from cascade_jax.model.nemotron_h import Backends
from cascade_jax.parallel.mesh import MeshConfig

# `${bundled:tiny/sft.jsonl}` in a YAML file names a file shipped in cascade_jax/data/assets.
if not OmegaConf.has_resolver("bundled"):
    OmegaConf.register_resolver("bundled", lambda relative: os.path.join(ASSETS, relative))


@dataclasses.dataclass
class ModelSection:
    """Where the model comes from: a preset (from scratch), an HF directory, or a checkpoint directory."""

    preset: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)   # ModelConfig fields
    from_pretrained: str | None = None
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"    # master weights (fp32 for training)
    remat: str = "none"             # none | full | dots
    backends: Backends = dataclasses.field(default_factory=Backends)   # kernels and MoE dispatch

    def __post_init__(self):
        one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        one_of("model.param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        one_of("model.remat", self.remat, ("none", "full", "dots"))
        if self.from_pretrained is None:
            from cascade_jax.config import ModelConfig

            try:
                ModelConfig.preset(self.preset).replace(**self.overrides)
            except TypeError as e:   # an override that is no ModelConfig field
                raise ValueError(f"model.overrides: {e}") from None
            except ValueError as e:
                raise ValueError(f"model.{'overrides' if self.overrides else 'preset'}: {e}") from None


@dataclasses.dataclass
class OptimizerSection:
    """AdamW with linear warm-up and cosine decay from lr to min_lr (training.md §1.1)."""

    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 200
    decay_steps: int | None = None   # None: the run's total steps
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    freeze_router: bool = False

    def __post_init__(self):
        at_least("optimizer.lr", self.lr, 0.0, strict=True)
        at_least("optimizer.min_lr", self.min_lr, 0.0)
        at_least("optimizer.warmup_steps", self.warmup_steps, 0)
        at_least("optimizer.decay_steps", self.decay_steps, 1, none_ok=True)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"optimizer.{name}: expected a value in [0, 1), got {value}")
        at_least("optimizer.eps", self.eps, 0.0, strict=True)
        at_least("optimizer.weight_decay", self.weight_decay, 0.0)
        at_least("optimizer.clip_norm", self.clip_norm, 0.0, strict=True, none_ok=True)


@dataclasses.dataclass
class MoESection:
    """Aux-loss-free balancing: bias += rate · sign(mean load − load) after every step; 0 disables."""

    bias_update_rate: float = 1e-3

    def __post_init__(self):
        at_least("moe.bias_update_rate", self.bias_update_rate, 0.0)


@dataclasses.dataclass
class TrainSection:
    steps: int = 100
    micro_batches: int = 1          # gradient accumulation: batches of data.batch_size rows per step
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    eval_data: str | None = None     # JSONL of held-out chat samples (eval loss); None skips it
    accuracy_eval_every: int = 0     # >0: greedy answers on held-out tasks, checked by their verifiers
    accuracy_eval_tasks: str | None = None   # JSONL of prompts with `verifier` specs
    accuracy_eval_samples: int = 32
    accuracy_thinking: bool = False  # prompt in thinking mode (longer answers) or with an empty think block
    accuracy_max_new_tokens: int = 48
    peak_flops_per_device: float | None = None   # for MFU; None: looked up from the device kind
    loss_chunk_size: int = 512

    def __post_init__(self):
        for name in ("steps", "micro_batches", "log_every", "eval_batches", "accuracy_eval_samples",
                     "accuracy_max_new_tokens", "loss_chunk_size"):
            at_least(f"train.{name}", getattr(self, name), 1)
        at_least("train.eval_every", self.eval_every, 0)
        at_least("train.accuracy_eval_every", self.accuracy_eval_every, 0)
        at_least("train.peak_flops_per_device", self.peak_flops_per_device, 0.0, strict=True, none_ok=True)
        for name in ("eval_data", "accuracy_eval_tasks"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"train.{name}: no such file {path}")


@dataclasses.dataclass
class CheckpointSection:
    every: int = 50
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        at_least("checkpoint.every", self.every, 1)
        at_least("checkpoint.keep", self.keep, 1)


@dataclasses.dataclass
class SFTConfig:
    run_dir: str = "runs/sft-tiny"
    resume: bool = True               # continue from the latest checkpoint in run_dir when there is one
    allow_config_change: bool = False # resume although keys that change the math differ (recorded in the run)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    moe: MoESection = dataclasses.field(default_factory=MoESection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)   # all 1: one device, no mesh


class RunConfigError(ValueError):
    """A bad config file or override; the message is one line."""


def at_least(name: str, value, low, *, strict: bool = False, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if value is None or value < low or (strict and value == low):
        raise ValueError(f"{name}: expected a number {'>' if strict else '>='} {low}, got {value}")


def one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def load_config(schema: type, path: str | None = None, overrides: list[str] = (), tree: dict | None = None,
                tree_name: str = "config"):
    """YAML file (or an already parsed `tree`, called `tree_name` in errors), then dotted overrides, into the
    `schema` dataclass; each step's errors name the key."""
    merged = OmegaConf.structured(schema)
    for source, load in ((path, lambda: OmegaConf.load(path)), (None if tree is None else tree_name, lambda: tree),
                         ("overrides", lambda: OmegaConf.from_dotlist(list(overrides)))):
        if source is None:
            continue
        try:
            merged = OmegaConf.merge(merged, load())
        except FileNotFoundError:
            raise RunConfigError(f"{path}: no such config file") from None
        except OmegaConfBaseException as e:
            raise RunConfigError(f"{source}: {_omegaconf_message(e)}") from None
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RunConfigError(f"config: {_omegaconf_message(e)}") from None
    except ValueError as e:   # a section's own validation: "optimizer.lr: expected ..."
        raise RunConfigError(str(e).splitlines()[0]) from None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    message = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    return f"{key}: {message}" if key else message


def load_sft_config(path: str | None = None, overrides: list[str] = ()) -> SFTConfig:
    return load_config(SFTConfig, path, overrides)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys whose change leaves the math of a resumed run as it was: where things are written, how often they are
# logged or evaluated, how data is read (not which data), kernels, remat and the mesh (the same computation;
# reductions may round differently).
_BOOKKEEPING = ("run_dir", "resume", "allow_config_change", "checkpoint.", "mesh.", "model.remat",
                "model.backends.attention", "model.backends.grouped_matmul", "model.backends.moe_dispatch",
                "model.backends.ssd",
                "train.log_every", "train.eval_every", "train.eval_batches", "train.eval_data", "train.accuracy_",
                "train.peak_flops_per_device", "data.worker_count", "data.worker_buffer_size",
                "data.tokenize_in_background", "data.log_first", "data.strict")


def math_changes(recorded_yaml: str, cfg) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded, now)} for every key that differs and changes what a resumed run computes."""
    old = _flatten(OmegaConf.to_container(OmegaConf.create(recorded_yaml)))
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not any(k == b or (b.endswith((".", "_")) and k.startswith(b))
                                                     for b in _BOOKKEEPING)}


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}
