"""Held-out evaluation of a train state: loss on a chat set, and task accuracy by greedy answers.

Accuracy uses verifiable tasks: each record holds a prompt and a verifier spec (boxed number, instruction
constraints, multiple choice, unit tests), scored by `cascade_jax.data.tasks`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flax import nnx

from cascade_jax.data import ChatTokenizer, SFTData
from cascade_jax.data.config import DataConfig, SourceConfig
from cascade_jax.data.tasks import verify
from cascade_jax.inference import Engine, SamplingParams, generate
from cascade_jax.inference.engine import prompt_width
from cascade_jax.train.state import TrainState
from cascade_jax.train.step import eval_loss_sums


def read_task_prompts(path: str, limit: int) -> list[dict]:
    """The first `limit` records of a JSONL file of prompts with `verifier` specs."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "messages" not in record or "verifier" not in record:
                raise ValueError(f"{path}:{number}: expected an object with 'messages' and 'verifier'")
            records.append(record)
            if len(records) == limit:
                break
    return records


def held_out_data(data: DataConfig, path: str) -> DataConfig:
    """The run's data settings (tokenizer, packing, max_len) on a held-out file, read once in order."""
    return dataclasses.replace(data, sources=[SourceConfig(paths=[path], name="eval")], num_epochs=1.0,
                               shuffle=False, shuffle_rows=False, drop_remainder=False, worker_count=0)


class HeldOutLoss:
    """Token-level mean loss over the first `batches` batches of a held-out set."""

    def __init__(self, data: DataConfig, tokenizer: ChatTokenizer, graphdef: nnx.GraphDef, loss_fn, batches: int):
        self.data, self.tokenizer, self.graphdef = data, tokenizer, graphdef
        self.loss_fn, self.batches = loss_fn, batches

    def __call__(self, state: TrainState, step: int) -> dict[str, float]:
        total, count = 0.0, 0.0
        iterator = iter(SFTData(self.data, self.tokenizer))
        for _ in range(self.batches):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            s, c = eval_loss_sums(state.params, state.expert_bias, batch, graphdef=self.graphdef, loss_fn=self.loss_fn)
            total, count = total + float(s), count + float(c)
        return {"eval_loss": total / max(count, 1.0)}


class TaskAccuracy:
    """eval_accuracy: fraction fully solved (reward 1); eval_reward: mean verifier reward (partial credit)."""

    def __init__(self, tasks: list[dict], tokenizer: ChatTokenizer, graphdef: nnx.GraphDef, *,
                 thinking: bool, max_new_tokens: int):
        self.tasks, self.tokenizer, self.graphdef = tasks, tokenizer, graphdef
        self.max_new_tokens = max_new_tokens
        self.prompts = [tokenizer.encode_prompt(r["messages"], r.get("tools"), enable_thinking=thinking)
                        for r in tasks]
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                     stop_token_ids=(tokenizer.eos_id,))
        self.engine: Engine | None = None   # made at the first evaluation, then reused (compiled once)

    def __call__(self, state: TrainState, step: int) -> dict[str, float]:
        model = nnx.merge(self.graphdef, state.params, state.expert_bias)
        if self.engine is None:
            width = max(prompt_width(len(p)) for p in self.prompts)
            self.engine = Engine(model, max_slots=min(len(self.prompts), 64), max_len=width + self.max_new_tokens)
        answers = [c.tokens for c in generate(model, self.prompts, self.params, engine=self.engine)]
        rewards = [verify(self.tokenizer.decode(a, skip_special_tokens=True), r["verifier"])
                   for a, r in zip(answers, self.tasks)]
        return {"eval_accuracy": float(np.mean(np.asarray(rewards) >= 1.0)), "eval_reward": float(np.mean(rewards))}
