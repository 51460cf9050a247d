"""Typed data configs (filled from YAML by the config loader, or built directly in Python).

Every config checks its values when it is built (``__post_init__`` → ``validate()``), also when
``OmegaConf.to_object`` builds it from YAML: a bad value raises a one-line ``ValueError`` that starts
with the field, e.g. ``data.max_len: expected an integer > 0, got -1``. Types and unknown keys are
OmegaConf's part; ranges and choices are checked here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TINY_TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer")
TINY_DATA = os.path.join(ASSETS, "tiny")

LOSS_ON = ("all_assistant", "last_assistant")
TOO_LONG = ("drop", "truncate")
PACKING = ("first_fit", "best_fit")


def _fail(where: str, expected: str, value: Any) -> None:
    raise ValueError(f"{where}: expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(where: str, value: Any, *, low: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or (low is not None and value < low):
        expected = "an integer" if low is None else "an integer > 0" if low == 1 else f"an integer >= {low}"
        _fail(where, expected + (" or null" if optional else ""), value)


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)


def _check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(where, "one of " + ", ".join(map(repr, allowed)), value)


def _check_path(where: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        _fail(where, "a non-empty path", value)


def _check_num_epochs(where: str, value: Any) -> None:
    if value is not None and not (_is_number(value) and value > 0):
        _fail(where, "a number > 0, or null to repeat forever", value)


def _check_shard(section: str, index: Any, count: Any) -> None:
    if (index is None) != (count is None):
        raise ValueError(f"{section}.shard_index, {section}.shard_count: expected both or neither, got "
                         f"shard_index={index!r}, shard_count={count!r}")
    if count is None:
        return
    _check_int(f"{section}.shard_count", count, low=1)
    if not _is_int(index) or not 0 <= index < count:
        _fail(f"{section}.shard_index", f"an integer in [0, shard_count={count})", index)


@dataclasses.dataclass
class SourceConfig:
    """One data source: local JSONL / Parquet / ArrayRecord paths or globs, and its mixture weight.

    ``weight`` is relative to the other sources; 0 switches the source off (its files are not opened).
    The values are checked by the config holding the source (``data.sources[i].<field>``).
    """

    paths: list[str]
    weight: float = 1.0
    name: str = ""

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.name and isinstance(self.paths, (list, tuple)) and self.paths and isinstance(self.paths[0], str):
            self.name = os.path.basename(self.paths[0])

    def validate(self, where: str = "source") -> None:
        """Raises ``ValueError("<where>.<field>: expected …, got …")``."""
        if not isinstance(self.paths, (list, tuple)) or not self.paths:
            _fail(f"{where}.paths", "a list of one or more files or globs", self.paths)
        for j, p in enumerate(self.paths):
            _check_path(f"{where}.paths[{j}]", p)
        if not (_is_number(self.weight) and self.weight >= 0):
            _fail(f"{where}.weight", "a number >= 0 (0 switches the source off)", self.weight)
        if not isinstance(self.name, str):
            _fail(f"{where}.name", "a string", self.name)


def _sources(value: Any, section: str) -> list[SourceConfig]:
    """Python convenience: a path, a list of paths / mappings / SourceConfigs → list[SourceConfig]."""
    if isinstance(value, (str, SourceConfig, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        _fail(f"{section}.sources", "a list of sources", value)
    out = []
    for i, v in enumerate(value):
        if isinstance(v, SourceConfig):
            out.append(v)
        elif isinstance(v, str):
            out.append(SourceConfig(paths=[v]))
        elif isinstance(v, dict):
            unknown = sorted(set(v) - {f.name for f in dataclasses.fields(SourceConfig)})
            if unknown or "paths" not in v:
                _fail(f"{section}.sources[{i}]", "a mapping with `paths` and optionally `weight`, `name`", v)
            out.append(SourceConfig(**v))
        else:
            _fail(f"{section}.sources[{i}]", "a path, a list of paths or a mapping with `paths`", v)
    return out


def _check_sources(section: str, sources: list[SourceConfig]) -> None:
    if not sources:
        _fail(f"{section}.sources", "at least one source", sources)
    for i, s in enumerate(sources):
        s.validate(f"{section}.sources[{i}]")
    if not any(s.weight > 0 for s in sources):
        _fail(f"{section}.sources", "at least one source with weight > 0", [s.weight for s in sources])


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
        self.sources = _sources(self.sources, "data")
        self.validate()

    def validate(self) -> None:
        """Raises a one-line ``ValueError("data.<field>: expected …, got …")`` for the first bad value."""
        _check_sources("data", self.sources)
        _check_path("data.tokenizer", self.tokenizer)
        for name in ("max_len", "batch_size", "num_packing_bins", "tokenize_chunk", "worker_buffer_size"):
            _check_int(f"data.{name}", getattr(self, name), low=1)
        _check_int("data.max_docs_per_row", self.max_docs_per_row, low=1, optional=True)
        for name in ("log_first", "worker_count"):
            _check_int(f"data.{name}", getattr(self, name), low=0)
        _check_int("data.seed", self.seed)
        _check_num_epochs("data.num_epochs", self.num_epochs)
        for name in ("shuffle", "shuffle_rows", "drop_remainder", "strict", "tokenize_in_background"):
            _check_bool(f"data.{name}", getattr(self, name))
        _check_choice("data.loss_on", self.loss_on, LOSS_ON)
        _check_choice("data.too_long", self.too_long, TOO_LONG)
        _check_choice("data.packing", self.packing, PACKING)
        _check_shard("data", self.shard_index, self.shard_count)


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
        self.sources = _sources(self.sources, "prompts")
        self.validate()

    def validate(self) -> None:
        """Raises a one-line ``ValueError("prompts.<field>: expected …, got …")`` for the first bad value."""
        _check_sources("prompts", self.sources)
        _check_path("prompts.tokenizer", self.tokenizer)
        for name in ("prompts_per_step", "group_size", "max_prompt_len"):
            _check_int(f"prompts.{name}", getattr(self, name), low=1)
        _check_int("prompts.log_first", self.log_first, low=0)
        _check_int("prompts.seed", self.seed)
        _check_num_epochs("prompts.num_epochs", self.num_epochs)
        for name in ("enable_thinking", "shuffle", "drop_remainder", "strict"):
            _check_bool(f"prompts.{name}", getattr(self, name))
        _check_shard("prompts", self.shard_index, self.shard_count)
