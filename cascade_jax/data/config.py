"""Typed data configs (filled from YAML by the config loader, or built directly in Python)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TINY_TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer")
TINY_DATA = os.path.join(ASSETS, "tiny")


@dataclasses.dataclass
class SourceConfig:
    """One data source: local JSONL / Parquet / ArrayRecord paths or globs, and its mixture weight."""

    paths: list[str]
    weight: float = 1.0
    name: str = ""

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths:
            raise ValueError("data source: `paths` must name at least one file or glob")
        if not self.weight > 0:
            raise ValueError(f"data source {self.name or self.paths[0]}: weight must be > 0, got {self.weight}")
        self.name = self.name or os.path.basename(self.paths[0])


def _sources(value: Any) -> list[SourceConfig]:
    if isinstance(value, (str, SourceConfig, dict)):
        value = [value]
    out = []
    for v in value:
        if isinstance(v, SourceConfig):
            out.append(v)
        elif isinstance(v, str):
            out.append(SourceConfig(paths=[v]))
        elif isinstance(v, dict):
            out.append(SourceConfig(**v))
        else:
            raise ValueError(f"data source must be a path, a list of paths or a mapping, got {v!r}")
    if not out:
        raise ValueError("data: `sources` must not be empty")
    return out


def _from_dict(cls, d: dict[str, Any], section: str):
    """Build a config dataclass, naming unknown keys in one line."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"data.{name} must be a positive number, got {value!r}")


@dataclasses.dataclass
class DataConfig:
    """SFT data: sources → chat template + loss mask → packed rows of ``max_len`` tokens → batches.

    ``batch_size`` is the number of packed rows per batch on this process (JAX process); records are
    sharded across processes by index (``shard_index::shard_count``, default: JAX process index and
    count). ``num_epochs`` may be fractional (1.5 = every sample once, then half of them again in a
    fresh order); None repeats forever. ``loss_mask`` in the batches is int32 (0/1).
    """

    sources: list[SourceConfig] = dataclasses.field(
        default_factory=lambda: [SourceConfig(paths=[os.path.join(TINY_DATA, "sft.jsonl")], name="tiny-sft")])
    tokenizer: str = TINY_TOKENIZER
    max_len: int = 262144
    batch_size: int = 1
    seed: int = 0
    num_epochs: float | None = 1.0
    shuffle: bool = True
    loss_on: str = "all_assistant"  # or "last_assistant"
    too_long: str = "drop"  # or "truncate"
    packing: str = "first_fit"  # or "best_fit"
    num_packing_bins: int = 16
    max_docs_per_row: int | None = 1024
    shuffle_rows: bool = True
    drop_remainder: bool = True
    strict: bool = False
    log_first: int = 5
    tokenize_chunk: int = 256
    tokenize_in_background: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    shard_index: int | None = None
    shard_count: int | None = None

    def __post_init__(self):
        self.sources = _sources(self.sources)
        for name in ("max_len", "batch_size", "num_packing_bins", "tokenize_chunk"):
            _positive(name, getattr(self, name))
        _positive("num_epochs", self.num_epochs, allow_none=True)
        _positive("max_docs_per_row", self.max_docs_per_row, allow_none=True)
        choices = {"loss_on": ("all_assistant", "last_assistant"), "too_long": ("drop", "truncate"),
                   "packing": ("first_fit", "best_fit")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("data.shard_index and data.shard_count must be given together (or neither)")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"data.shard_index={self.shard_index} must be in [0, shard_count={self.shard_count})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        return _from_dict(cls, d, "data")


@dataclasses.dataclass
class PromptConfig:
    """RL prompts: each step draws ``prompts_per_step`` prompts, each repeated ``group_size`` times."""

    sources: list[SourceConfig] = dataclasses.field(
        default_factory=lambda: [SourceConfig(paths=[os.path.join(TINY_DATA, "rl.jsonl")], name="tiny-rl")])
    tokenizer: str = TINY_TOKENIZER
    prompts_per_step: int = 8
    group_size: int = 4
    max_prompt_len: int = 4096
    enable_thinking: bool = True
    seed: int = 0
    num_epochs: float | None = None
    shuffle: bool = True
    drop_remainder: bool = True
    strict: bool = False
    log_first: int = 5
    shard_index: int | None = None
    shard_count: int | None = None

    def __post_init__(self):
        self.sources = _sources(self.sources)
        for name in ("prompts_per_step", "group_size", "max_prompt_len"):
            _positive(name, getattr(self, name))
        _positive("num_epochs", self.num_epochs, allow_none=True)
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("prompts.shard_index and prompts.shard_count must be given together (or neither)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptConfig":
        return _from_dict(cls, d, "prompts")
