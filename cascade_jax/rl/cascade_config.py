"""A cascade recipe (`configs/cascade/<recipe>.yaml`): stages in order, each one GRPO or MOPD stage.

    run_dir: runs/cascade-tiny
    sft: {config: configs/sft/tiny.yaml}     # optional: an SFT run first (its own run_dir); or `start: CKPT`
    defaults: {...}                          # RLConfig fields every stage shares
    stages:
      - name: if_rl
        kind: grpo                           # grpo | mopd
        domains: [instruction_following]     # the held-out domains this stage trains
        settings: {...}                      # RLConfig fields over the defaults (prompts, reward, grpo, ...)
      - name: mopd
        kind: mopd
        settings: {mopd: {teachers: {math: start, instruct: stage:if_rl}, routing: {...}}}

A stage starts from the previous main-line stage's result (`from:` overrides: `start` or `stage:NAME`); a
`side_branch` stage (e.g. an RLHF teacher trained from the SFT checkpoint) is not the next stage's start.
Checkpoint references `start` and `stage:NAME` work wherever a stage names a checkpoint (`mopd.teachers`,
`reward.judge.serve`). Each stage's settings become an `RLConfig` validated before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade_jax.rl.config import RLConfig
from cascade_jax.train.config import RunConfigError, at_least, load_config, one_of


@dataclasses.dataclass
class StageSpec:
    name: str = "???"
    kind: str = "grpo"                  # grpo | mopd
    start: str | None = None            # None: the previous main-line stage's result; `start` | `stage:NAME`
    side_branch: bool = False           # trained, evaluated and kept (e.g. as a teacher), not continued from
    domains: list[str] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SFTStage:
    config: str | None = None           # an SFT recipe run (or found complete) before the RL stages
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CascadeEval:
    suite: str = "tiny"                 # cascade-eval's suite, run on the start and after every stage
    limit_per_domain: int | None = None
    pass_k: int = 4
    max_new_tokens: int | None = None
    teacher_margin: float = 0.05        # MOPD: a distilled domain within this of its teacher counts as recovered

    def __post_init__(self):
        at_least("eval.pass_k", self.pass_k, 1)
        at_least("eval.limit_per_domain", self.limit_per_domain, 1, none_ok=True)
        at_least("eval.teacher_margin", self.teacher_margin, 0.0)


@dataclasses.dataclass
class CascadeConfig:
    run_dir: str = "runs/cascade-tiny"
    start: str | None = None            # the first stage's start; with sft.config, the SFT run's result
    sft: SFTStage = dataclasses.field(default_factory=SFTStage)
    export: str | None = None           # HF directory for the final result; None: RUN/hf
    eval: CascadeEval = dataclasses.field(default_factory=CascadeEval)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: list[StageSpec] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a cascade needs at least one stage")
        if (self.start is None) == (self.sft.config is None):
            raise ValueError("start: give exactly one of start (a checkpoint) and sft.config (an SFT recipe)")
        seen = set()
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if not stage.name or not stage.name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"{where}.name: expected letters, digits, - or _, got {stage.name!r}")
            if stage.name in seen or stage.name == "start":
                raise ValueError(f"{where}.name: {stage.name!r} is used twice (or is the reserved name 'start')")
            one_of(f"{where}.kind", stage.kind, ("grpo", "mopd"))
            if stage.start is not None:
                _check_reference(f"{where}.start", stage.start, seen)
            seen.add(stage.name)


def _check_reference(key: str, value: str, earlier: set[str]) -> None:
    if value.startswith("stage:") and value.removeprefix("stage:") not in earlier:
        raise ValueError(f"{key}: {value} names no earlier stage (earlier: {', '.join(sorted(earlier)) or 'none'})")


def load_cascade_config(path: str, overrides: list[str] = ()) -> CascadeConfig:
    """The recipe, then dotted overrides; an override may index the stage list (`stages.0.settings.train.steps=2`)."""
    if not overrides:
        return load_config(CascadeConfig, path)
    try:
        recipe = OmegaConf.load(path)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise RunConfigError(f"overrides: expected key=value, got {item!r}")
            OmegaConf.update(recipe, key, yaml.safe_load(value) if value else None, merge=True)
    except FileNotFoundError:
        raise RunConfigError(f"{path}: no such config file") from None
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise RunConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    return load_config(CascadeConfig, tree=OmegaConf.to_container(recipe), tree_name=path)


def is_cascade_recipe(path: str | None) -> bool:
    """Whether a YAML file is a cascade recipe (has `stages:`) rather than one stage's RLConfig."""
    if path is None or not os.path.isfile(path):
        return False
    try:
        return "stages" in (OmegaConf.load(path) or {})
    except (OmegaConfBaseException, ValueError, OSError):
        return False


def stage_dir(run_dir: str, index: int, name: str) -> str:
    return os.path.join(run_dir, "stages", f"{index:02d}-{name}")


def stage_config(cfg: CascadeConfig, index: int, cascade_start: str, default_start: str) -> RLConfig:
    """Stage `index` as an RLConfig: the defaults, its settings, its run dir and start (`default_start` unless
    the stage says otherwise), references resolved (`start` is `cascade_start`)."""
    stage = cfg.stages[index]
    dirs = {s.name: stage_dir(cfg.run_dir, i, s.name) for i, s in enumerate(cfg.stages[:index])}

    def resolve(key: str, value: str) -> str:
        if value == "start":
            return cascade_start
        if value.startswith("stage:"):
            _check_reference(key, value, set(dirs))
            return dirs[value.removeprefix("stage:")]
        return value

    where = f"stages[{index}] ({stage.name})"
    try:
        settings = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(cfg.defaults),
                                                          OmegaConf.create(stage.settings)), resolve=True)
    except OmegaConfBaseException as e:
        raise RunConfigError(f"{where}.settings: {str(e).splitlines()[0]}") from None
    mopd = settings.get("mopd") or {}
    for alias, path in (mopd.get("teachers") or {}).items():
        mopd["teachers"][alias] = resolve(f"{where}.settings.mopd.teachers.{alias}", str(path))
    judge = (settings.get("reward") or {}).get("judge") or {}
    if judge.get("serve"):
        judge["serve"] = resolve(f"{where}.settings.reward.judge.serve", str(judge["serve"]))
    start = resolve(f"{where}.start", stage.start) if stage.start else default_start
    settings.update(algorithm=stage.kind, run_dir=stage_dir(cfg.run_dir, index, stage.name))
    settings.setdefault("model", {})["from_pretrained"] = start
    try:
        return load_config(RLConfig, tree=settings, tree_name="settings")
    except RunConfigError as e:
        raise RunConfigError(f"{where}: {e}") from None
