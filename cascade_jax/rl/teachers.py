"""MOPD teachers (training.md §3.1): checkpoints of the same model, each prompt routed to one by its domain.

Teachers that name the same checkpoint are loaded once. With `resident: all` every teacher stays in memory;
with `resident: one` a single teacher is held at a time and the step scores its rollouts teacher by teacher
(each teacher is loaded once per step, the others freed first). A teacher's log-probs of the student's
sampled tokens come from one forward pass over prompt + response per packed row, lm_head in chunks
(`rl.logprobs.micro_batched_log_probs`), never a [tokens, vocab] array.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from cascade_jax.rl.config import MOPDSection
from cascade_jax.rl.logprobs import SamplingFilter, micro_batched_log_probs
from cascade_jax.train.state import split_model
from cascade_jax.weights.load import load_pretrained


class Teachers:
    def __init__(self, section: MOPDSection, *, dtype: str, param_dtype: str, student_config):
        self.section, self.dtype, self.param_dtype = section, dtype, param_dtype
        self.student_config = student_config
        for alias, path in section.teachers.items():
            if not os.path.exists(path):
                raise ValueError(f"mopd.teachers.{alias}: no such checkpoint {path}")
        # One entry per distinct checkpoint; aliases naming the same one share it.
        self.paths = list(dict.fromkeys(os.path.realpath(p) for p in section.teachers.values()))
        self.index = {alias: self.paths.index(os.path.realpath(p)) for alias, p in section.teachers.items()}
        self.names = [", ".join(a for a, i in self.index.items() if i == j) for j in range(len(self.paths))]
        self.resident: dict[int, tuple] = {}
        if section.resident == "all":
            for j in range(len(self.paths)):
                self.resident[j] = self._load(j)

    def _load(self, j: int) -> tuple:
        model = load_pretrained(self.paths[j], dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        if model.config != self.student_config:
            raise ValueError(f"mopd.teachers ({self.names[j]}): {self.paths[j]} is not the student's architecture; "
                             f"MOPD compares log-probs over one vocabulary, so teachers must be checkpoints of the "
                             f"same model")
        return split_model(model)

    def _get(self, j: int) -> tuple:
        if j not in self.resident:
            self.resident.clear()     # `resident: one`: free the previous teacher before loading the next
            self.resident[j] = self._load(j)
        return self.resident[j]

    def route(self, metas: list[dict]) -> np.ndarray:
        """The teacher (index into `paths`) of each rollout, from its prompt's domain, else its source."""
        routing, default = self.section.routing, self.section.default_teacher
        chosen = []
        for meta in metas:
            alias = routing.get(meta.get("domain", "")) or routing.get(meta.get("source", "")) or default
            if alias is None:
                raise ValueError(f"mopd.routing: no teacher for domain {meta.get('domain')!r} / source "
                                 f"{meta.get('source')!r} ({meta.get('loc', '?')}); add it or set mopd.default_teacher")
            chosen.append(self.index[alias])
        return np.asarray(chosen, np.int32)

    def log_probs(self, batch: dict, sequence_teacher: np.ndarray, sampling: SamplingFilter,
                  chunk_size: int) -> np.ndarray:
        """[A, B, T] teacher log-prob of every response token, each sequence scored by its own teacher.

        A teacher runs only over the micro-batches holding its sequences (their count padded to a power of two by
        repeating indices, so few shapes compile)."""
        sequence = batch["sequence"]
        token_teacher = np.where(sequence >= 0, sequence_teacher[np.maximum(sequence, 0)], -1)
        out = np.zeros(sequence.shape, np.float32)
        fields = {k: batch[k] for k in ("tokens", "targets", "segment_ids", "loss_mask")}
        for j in range(len(self.paths)):
            mine = token_teacher == j
            used = np.flatnonzero(mine.any(axis=(1, 2)))
            if not len(used):
                continue
            padded = np.resize(used, 1 << (len(used) - 1).bit_length())
            graphdef, params, expert_bias = self._get(j)
            logp = np.asarray(micro_batched_log_probs(params, expert_bias, {k: v[padded] for k, v in fields.items()},
                                                      graphdef=graphdef, sampling=sampling, chunk_size=chunk_size))
            out[used] = np.where(mine[used], logp[:len(used)], out[used])
        return out
