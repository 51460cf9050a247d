"""Held-out score of a judge-rewarded stage (RLHF): how often the pairwise judge prefers the policy's greedy
answer to the stage start's on held-out prompts (an ArenaHard-style win rate against a fixed baseline).

Each prompt is judged in both orders (position bias cancels), a comparison counts for the response its
ranking favours (1–3: the first, 4–6: the second), malformed verdicts are left out and counted. The start's
answers come from the stage's starting weights, so a resumed stage compares against the same baseline; at
the start the two answers are equal and the win rate measures only the judge's consistency.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from cascade_jax.inference import Engine, SamplingParams, generate
from cascade_jax.inference.engine import prompt_width
from cascade_jax.rl.rewards import strip_end_tokens
from cascade_jax.rl.rewards.judge import JudgeClient, JudgeConfig
from cascade_jax.rl.rewards.pairwise import parse_comparison, render_comparison


class JudgeWinRate:
    def __init__(self, tasks: list[dict], tokenizer, graphdef, baseline_weights, judge: JudgeConfig, *,
                 thinking: bool, max_new_tokens: int):
        self.tokenizer, self.graphdef, self.baseline_weights, self.judge = tokenizer, graphdef, baseline_weights, judge
        self.texts = [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user") for r in tasks]
        self.prompts = [tokenizer.encode_prompt(r["messages"], r.get("tools"), enable_thinking=thinking) for r in tasks]
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
        self.max_new_tokens = max_new_tokens
        self.engine: Engine | None = None
        self.baseline: list[str] | None = None

    def _answers(self, params, expert_bias) -> list[str]:
        model = nnx.merge(self.graphdef, params, expert_bias)
        if self.engine is None:
            width = max(prompt_width(len(p)) for p in self.prompts)
            self.engine = Engine(model, max_slots=min(len(self.prompts), 64), max_len=width + self.max_new_tokens)
        outs = generate(model, self.prompts, self.params, engine=self.engine)
        return [strip_end_tokens(self.tokenizer.decode(o.tokens, skip_special_tokens=False)) for o in outs]

    def __call__(self, state, step: int) -> dict[str, float]:
        if self.baseline is None:
            self.baseline = self._answers(*self.baseline_weights)
        current = self._answers(state.params, state.expert_bias)
        messages = [render_comparison(p, c, b) for p, c, b in zip(self.texts, current, self.baseline)]
        messages += [render_comparison(p, b, c) for p, c, b in zip(self.texts, current, self.baseline)]
        replies, _, _ = JudgeClient(self.judge).complete(messages)
        n = len(self.texts)
        wins, malformed = [], 0
        for i, reply in enumerate(replies):
            verdict = parse_comparison(reply)
            if verdict is None:
                malformed += 1
                continue
            first_wins = verdict[2] <= 3
            wins.append(first_wins if i < n else not first_wins)
        return {"eval_judge_win_rate": float(np.mean(wins)) if wins else 0.0,
                "eval_judge_malformed": float(malformed)}
