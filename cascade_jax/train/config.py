"""SFT run configuration: YAML files into typed dataclasses, with dotted command-line overrides.

    cfg = load_sft_config("configs/sft/tiny.yaml", ["optimizer.lr=3e-6", "train.steps=20"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

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


@dataclasses.dataclass
class MoESection:
    """Aux-loss-free balancing: bias += rate · sign(mean load − load) after every step; 0 disables."""

    bias_update_rate: float = 1e-3


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


@dataclasses.dataclass
class CheckpointSection:
    every: int = 50
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass
class SFTConfig:
    run_dir: str = "runs/sft-tiny"
    resume: bool = True               # continue from the latest checkpoint in run_dir when there is one
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    moe: MoESection = dataclasses.field(default_factory=MoESection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)   # all 1: one device, no mesh


class RunConfigError(ValueError):
    """A bad config file or override; the message is one line."""


def load_sft_config(path: str | None = None, overrides: list[str] = ()) -> SFTConfig:
    try:
        merged = OmegaConf.structured(SFTConfig)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        first_line = str(e).splitlines()[0]
        raise RunConfigError(f"{path or 'config'}: {first_line}") from None
    except FileNotFoundError:
        raise RunConfigError(f"{path}: no such config file") from None


def to_yaml(cfg: SFTConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
