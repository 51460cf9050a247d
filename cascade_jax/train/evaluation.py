"""Periodic evaluation during SFT: held-out loss, and held-out task accuracy by greedy answers.

Accuracy uses the bundled verifiable tasks: each record holds a prompt and a verifier spec (boxed
number, instruction constraints, multiple choice, unit tests), scored by `cascade_jax.data.tasks`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flax import nnx

from cascade_jax.data import ChatTokenizer, SFTData
from cascade_jax.data.config import SourceConfig
from cascade_jax.data.tasks import verify
from cascade_jax.inference.greedy import greedy_generate
from cascade_jax.train.config import SFTConfig
from cascade_jax.train.metrics import MetricsWriter
from cascade_jax.train.state import TrainState
from cascade_jax.train.step import eval_loss_sums


def read_task_prompts(path: str, limit: int) -> list[dict]:
    """The first `limit` records of a JSONL file of prompts with `verifier` specs."""
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if len(records) == limit:
                break
    return records


class Evaluator:
    def __init__(self, cfg: SFTConfig, tokenizer: ChatTokenizer, graphdef: nnx.GraphDef):
        self.cfg, self.tokenizer, self.graphdef = cfg, tokenizer, graphdef
        t = cfg.train
        self.loss_data = None
        if t.eval_data and t.eval_every > 0:
            self.loss_data = dataclasses.replace(
                cfg.data, sources=[SourceConfig(paths=[t.eval_data], name="eval")], num_epochs=1.0,
                shuffle=False, shuffle_rows=False, drop_remainder=False, worker_count=0)
        self.tasks = []
        if t.accuracy_eval_every > 0 and t.accuracy_eval_tasks:
            self.tasks = read_task_prompts(t.accuracy_eval_tasks, t.accuracy_eval_samples)

    def run(self, state: TrainState, step: int, writer: MetricsWriter) -> dict[str, float]:
        t, results = self.cfg.train, {}
        if self.loss_data is not None and step % t.eval_every == 0:
            results["eval_loss"] = self.loss(state)
        if self.tasks and step % t.accuracy_eval_every == 0:
            results.update(self.accuracy(state))
        if results:
            writer.write(step, results)
        return results

    def loss(self, state: TrainState) -> float:
        total, count = 0.0, 0.0
        iterator = iter(SFTData(self.loss_data, self.tokenizer))
        for _ in range(self.cfg.train.eval_batches):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            s, c = eval_loss_sums(state.params, state.expert_bias, batch, graphdef=self.graphdef,
                                  chunk_size=self.cfg.train.loss_chunk_size)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def accuracy(self, state: TrainState) -> dict[str, float]:
        """eval_accuracy: fraction fully solved (reward 1); eval_reward: mean verifier reward (partial credit)."""
        model = nnx.merge(self.graphdef, state.params, state.expert_bias)
        prompts = [self.tokenizer.encode_prompt(r["messages"], r.get("tools"),
                                                enable_thinking=self.cfg.train.accuracy_thinking)
                   for r in self.tasks]
        answers = greedy_generate(model, prompts, self.cfg.train.accuracy_max_new_tokens, [self.tokenizer.eos_id])
        rewards = [verify(self.tokenizer.decode(a, skip_special_tokens=True), r["verifier"])
                   for a, r in zip(answers, self.tasks)]
        return {"eval_accuracy": float(np.mean(np.asarray(rewards) >= 1.0)), "eval_reward": float(np.mean(rewards))}
