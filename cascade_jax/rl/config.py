"""GRPO stage configuration: YAML into typed dataclasses with dotted overrides, like the SFT config.

    cfg = load_rl_config("configs/rl/tiny.yaml", ["grpo.overlong=filter", "train.steps=20"])
"""

from __future__ import annotations

import dataclasses
import os

from cascade_jax.data.config import PromptConfig
from cascade_jax.parallel.mesh import MeshConfig
from cascade_jax.train.config import (
    CheckpointSection,
    ModelSection,
    MoESection,
    OptimizerSection,
    at_least,
    load_config,
    one_of,
)


@dataclasses.dataclass
class RolloutSection:
    """The sampler's settings for the G rollouts of each prompt (G = prompts.group_size)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_slots: int = 64             # sequences decoded at once
    sync_every: int = 8             # decode steps per host round trip

    def __post_init__(self):
        for name in ("max_new_tokens", "max_slots", "sync_every"):
            at_least(f"rollout.{name}", getattr(self, name), 1)
        at_least("rollout.temperature", self.temperature, 0.0, strict=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p: expected a value in (0, 1], got {self.top_p}")
        at_least("rollout.top_k", self.top_k, 0)


@dataclasses.dataclass
class GRPOSection:
    """Advantages, filters and the loss (training.md §2.1, §2.6)."""

    leave_one_out: bool = False            # RLOO baseline + Bessel std (NeMo-RL) instead of Eq. 1's mean/std
    normalize_std: bool = True
    dynamic_filter: bool = True            # drop groups whose rewards are all equal
    overlong: str = "penalty"              # penalty (reward 0) | filter (out of the loss, in the baseline) | none
    importance_weights: str = "icepop"     # icepop (zero outside the band) | tis (clamp) | none
    importance_low: float = 0.5
    importance_high: float = 2.0
    mismatch_threshold: float | None = 2.0 # mask a sequence whose mean exp(|Δlogp|) exceeds it; None: off
    kl_coef: float = 0.0                   # > 0: KL to the stage's starting weights (RLHF uses 0.03, k3)
    kl_kind: str = "k3"
    group_max_mask: float | None = None    # mask a group whose best reward is <= this (agentless SWE: 0.5)
    train_logprobs: bool = True            # the no-gradient pass scoring the sampled tokens under the trainer;
                                           # false skips it (only with importance_weights none, no mismatch mask)

    def __post_init__(self):
        one_of("grpo.overlong", self.overlong, ("penalty", "filter", "none"))
        one_of("grpo.importance_weights", self.importance_weights, ("icepop", "tis", "none"))
        one_of("grpo.kl_kind", self.kl_kind, ("k1", "k2", "k3"))
        at_least("grpo.importance_low", self.importance_low, 0.0)
        if self.importance_high < self.importance_low:
            raise ValueError(f"grpo.importance_high: expected >= importance_low {self.importance_low}, "
                             f"got {self.importance_high}")
        at_least("grpo.mismatch_threshold", self.mismatch_threshold, 1.0, none_ok=True)
        at_least("grpo.kl_coef", self.kl_coef, 0.0)
        if not self.train_logprobs and (self.importance_weights != "none" or self.mismatch_threshold is not None):
            raise ValueError("grpo.train_logprobs: false needs importance_weights: none and mismatch_threshold: null "
                             "(both compare the trainer's log-probs with the sampler's)")


@dataclasses.dataclass
class MOPDSection:
    """Multi-domain on-policy distillation (training.md §3): per-token advantage log π_teacher − log π_train.

    `teachers` maps an alias to a checkpoint (any path of the checkpoint contract; in a cascade recipe also
    `start` or `stage:NAME`); `routing` maps a prompt's domain (or source) to an alias, `default_teacher` takes
    the rest. `outcome_weight` > 0 adds that times the GRPO outcome advantage (MiMo-V2-Flash's variant; the
    paper's Eq. 2 has none). `resident: one` keeps a single teacher in memory, loaded in turn each step."""

    teachers: dict[str, str] = dataclasses.field(default_factory=dict)
    routing: dict[str, str] = dataclasses.field(default_factory=dict)
    default_teacher: str | None = None
    outcome_weight: float = 0.0
    resident: str = "all"

    def __post_init__(self):
        one_of("mopd.resident", self.resident, ("all", "one"))
        at_least("mopd.outcome_weight", self.outcome_weight, 0.0)
        for key, alias in self.routing.items():
            if alias not in self.teachers:
                raise ValueError(f"mopd.routing.{key}: unknown teacher {alias!r}; teachers: "
                                 f"{', '.join(self.teachers) or 'none'}")
        if self.default_teacher is not None and self.default_teacher not in self.teachers:
            raise ValueError(f"mopd.default_teacher: unknown teacher {self.default_teacher!r}")


@dataclasses.dataclass
class JudgeSection:
    """An LLM judge behind an OpenAI-compatible endpoint: `base_url`, or `serve`: a checkpoint that the stage
    serves itself with cascade-serve for its duration (the tiny demo's judge)."""

    base_url: str | None = None
    serve: str | None = None
    model: str = "judge"
    timeout_s: float = 60.0
    max_concurrency: int = 8
    max_tokens: int = 256
    temperature: float = 0.0
    pairs: str = "all"             # pairwise: all pairs of a group ([C2]) | circular (NeMo-Gym's default)
    swap: bool = False             # pairwise: judge each pair in both orders (cancels a judge's position bias)

    def __post_init__(self):
        one_of("reward.judge.pairs", self.pairs, ("all", "circular"))
        at_least("reward.judge.timeout_s", self.timeout_s, 0.0, strict=True)
        at_least("reward.judge.max_concurrency", self.max_concurrency, 1)
        at_least("reward.judge.max_tokens", self.max_tokens, 1)


@dataclasses.dataclass
class RewardSection:
    kind: str = "verifier"      # verifier (each prompt's own rule) | judge (pointwise score) | pairwise_judge (RLHF)
    num_workers: int = 2        # reward worker processes
    timeout_s: float = 30.0     # per response; a reward over it gives 0 and is counted
    judge: JudgeSection = dataclasses.field(default_factory=JudgeSection)

    def __post_init__(self):
        one_of("reward.kind", self.kind, ("verifier", "judge", "pairwise_judge"))
        at_least("reward.num_workers", self.num_workers, 1)
        at_least("reward.timeout_s", self.timeout_s, 0.0, strict=True)
        if self.kind != "verifier" and not (self.judge.base_url or self.judge.serve):
            raise ValueError(f"reward.judge: reward.kind {self.kind} needs judge.base_url or judge.serve")


@dataclasses.dataclass
class RLTrainSection:
    steps: int = 50
    seed: int = 0                    # sampling seeds and the train state's key
    log_every: int = 1
    rows_per_micro_batch: int = 4    # packed rows per micro-batch
    row_len: int | None = None       # positions per packed row; None: prompts.max_prompt_len + max_new_tokens
    loss_chunk_size: int = 512
    accuracy_eval_every: int = 0     # >0: greedy answers on held-out tasks, checked by their verifiers
    accuracy_eval_tasks: str | None = None
    accuracy_eval_samples: int = 64
    accuracy_max_new_tokens: int = 64
    accuracy_thinking: bool = False
    judge_eval_every: int = 0        # >0 with a judge reward: held-out win rate against the stage start's answers
    judge_eval_tasks: str | None = None
    judge_eval_samples: int = 32

    def __post_init__(self):
        for name in ("steps", "log_every", "rows_per_micro_batch", "loss_chunk_size", "accuracy_eval_samples",
                     "accuracy_max_new_tokens"):
            at_least(f"train.{name}", getattr(self, name), 1)
        at_least("train.row_len", self.row_len, 2, none_ok=True)
        at_least("train.accuracy_eval_every", self.accuracy_eval_every, 0)
        at_least("train.judge_eval_every", self.judge_eval_every, 0)
        at_least("train.judge_eval_samples", self.judge_eval_samples, 1)
        if self.judge_eval_tasks is not None and not os.path.isfile(self.judge_eval_tasks):
            raise ValueError(f"train.judge_eval_tasks: no such file {self.judge_eval_tasks}")
        if self.accuracy_eval_tasks is not None and not os.path.isfile(self.accuracy_eval_tasks):
            raise ValueError(f"train.accuracy_eval_tasks: no such file {self.accuracy_eval_tasks}")


def _rl_optimizer() -> OptimizerSection:
    # training.md §2.3: AdamW β = (0.9, 0.95), constant LR 3e-6 after a short warm-up, no weight decay.
    return OptimizerSection(lr=3e-6, min_lr=3e-6, warmup_steps=10, b1=0.9, b2=0.95, weight_decay=0.0)


@dataclasses.dataclass
class RLConfig:
    algorithm: str = "grpo"           # grpo (outcome rewards) | mopd (teacher log-probs, training.md §3)
    run_dir: str = "runs/rl-tiny"
    resume: bool = True
    allow_config_change: bool = False
    model: ModelSection = dataclasses.field(default_factory=ModelSection)   # from_pretrained: the SFT run
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    mopd: MOPDSection = dataclasses.field(default_factory=MOPDSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=_rl_optimizer)
    moe: MoESection = dataclasses.field(default_factory=lambda: MoESection(bias_update_rate=0.0))  # router frozen
    train: RLTrainSection = dataclasses.field(default_factory=RLTrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=lambda: CheckpointSection(every=10))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        one_of("algorithm", self.algorithm, ("grpo", "mopd"))
        if self.train.judge_eval_every and (self.reward.kind == "verifier" or not self.train.judge_eval_tasks):
            raise ValueError("train.judge_eval_every: needs a judge reward (reward.kind judge or pairwise_judge) and "
                             "train.judge_eval_tasks")
        if self.algorithm == "mopd":
            if not self.mopd.teachers:
                raise ValueError("mopd.teachers: algorithm mopd needs at least one teacher checkpoint")
            if self.grpo.dynamic_filter:
                raise ValueError("grpo.dynamic_filter: MOPD's advantages come from the teachers, not from group "
                                 "rewards; set it to false")
            if not self.grpo.train_logprobs:
                raise ValueError("grpo.train_logprobs: MOPD's advantage is log π_teacher − log π_train; without the "
                                 "trainer's pass it would silently be the teacher's log-prob alone")
        if self.train.row_len is None:
            self.train.row_len = self.prompts.max_prompt_len + self.rollout.max_new_tokens
        longest = self.prompts.max_prompt_len + self.rollout.max_new_tokens - 1
        if self.train.row_len < longest:
            raise ValueError(f"train.row_len: expected >= prompts.max_prompt_len + rollout.max_new_tokens - 1 "
                             f"= {longest}, got {self.train.row_len}")


def load_rl_config(path: str | None = None, overrides: list[str] = ()) -> RLConfig:
    return load_config(RLConfig, path, overrides)
