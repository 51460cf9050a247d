"""Where a stage's rewards come from (`reward.kind`), opened for the stage's duration:

- verifier: each prompt's own rule (`verifier` in its record) in `RewardPool` worker processes;
- judge: an LLM judge's pointwise score in [0, 1] (long-context answers, agentless-SWE repairs);
- pairwise_judge: a GenRM-style judge over the pairs of each group, aggregated per training.md §2.5 (RLHF).

A judge is reached at `reward.judge.base_url`, or served by the stage itself (`reward.judge.serve: CKPT`):
a cascade-serve process started before the first rollout and stopped with the stage.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from cascade_jax.rl.config import RewardSection
from cascade_jax.rl.rewards import strip_end_tokens
from cascade_jax.rl.rewards.judge import JudgeClient, JudgeConfig, JudgeItem
from cascade_jax.rl.rewards.pairwise import PairwiseJudge
from cascade_jax.rl.rewards.pool import RewardPool


class StageRewards(contextlib.ExitStack):
    def __init__(self, section: RewardSection, group_size: int, log_dir: str | None = None):
        super().__init__()
        self.section, self.group_size, self.log_dir = section, group_size, log_dir
        self.pool: RewardPool | None = None
        self.judge_config: JudgeConfig | None = None
        self.judge: JudgeClient | PairwiseJudge | None = None   # made once the endpoint is known

    def __enter__(self) -> StageRewards:
        super().__enter__()
        s = self.section
        if s.kind == "verifier":
            self.pool = self.enter_context(RewardPool(num_workers=s.num_workers, timeout_s=s.timeout_s))
            return self
        j = s.judge
        base_url, model = j.base_url, j.model
        if not base_url:
            from cascade_jax.rl.judge_server import JudgeServer

            log = None
            if self.log_dir is not None:
                os.makedirs(self.log_dir, exist_ok=True)
                log = os.path.join(self.log_dir, "judge_server.log")
            server = self.enter_context(JudgeServer(j.serve, log_path=log))
            base_url, model = server.base_url, server.model
        self.judge_config = JudgeConfig(base_url=base_url, model=model, timeout_s=j.timeout_s,
                                        max_concurrency=j.max_concurrency, temperature=j.temperature,
                                        max_tokens=j.max_tokens)
        self.judge = (JudgeClient(self.judge_config) if s.kind == "judge" else
                      PairwiseJudge(self.judge_config, pairs=j.pairs, swap=j.swap))
        return self

    def score(self, texts: list[str], metas: list[dict]) -> tuple[np.ndarray, dict[str, int]]:
        """(reward per response, outcome counts); failures give 0 (or no comparison) and are counted."""
        kind = self.section.kind
        if kind == "verifier":
            rewards, _, counts = self.pool.score(texts, metas)
        elif kind == "judge":
            items = [JudgeItem(prompt=m["prompt_text"], response=strip_end_tokens(t), reference=m.get("reference_response"),
                               rubric=(m.get("verifier") or {}).get("rubric")) for t, m in zip(texts, metas)]
            rewards, _, counts = self.judge.score(items)
        else:
            rewards, counts = self.judge.group_rewards([m["prompt_text"] for m in metas], texts, self.group_size)
        return np.asarray(rewards, np.float32), counts
