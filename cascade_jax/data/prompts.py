"""RL prompt sets: the same sources as SFT, served as prompt groups for G rollouts each.

A prompt record is a chat sample whose ``messages`` end before the answer (a trailing assistant turn,
if any, is dropped and kept as ``reference_response``); every other top-level field (``domain``,
``verifier`` with the reference answer / unit tests / constraints, ``source``, …) is metadata. Each
step yields ``prompts_per_step`` prompts, each repeated ``group_size`` times in a row::

    {"prompt_tokens": [P*G int32 arrays], "group_ids": int32 [P*G], "messages": [P*G lists],
     "tools": [...], "domain": [...], "meta": [P*G dicts]}

Prompts longer than ``max_prompt_len`` tokens and bad records are skipped and counted (or raise
``DataError`` with ``file:line`` in strict mode); a whole pass over the records without a usable
prompt raises ``DataError``. The iterator state is the record stream position
plus skip counts, so an RL run resumes on the same prompts.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from cascade_jax.data.config import PromptConfig
from cascade_jax.data.mixture import RecordIndex, RecordIterDataset, active_sources, open_sources, process_shard
from cascade_jax.data.records import TOO_LONG, BadSample, PassGuard, SkipLog, chat_sample, sum_skip_counts
from cascade_jax.data.tokenize import ChatTokenizer


def prompt_from_record(raw: bytes | str | dict) -> dict:
    """``{"messages", "tools", "meta"}`` of one prompt record; raises ``BadSample``."""
    sample = chat_sample(raw, need_assistant=False)
    messages = sample["messages"]
    if messages[-1]["role"] == "assistant":
        sample["meta"].setdefault("reference_response", messages[-1]["content"])
        messages = messages[:-1]
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise BadSample("bad_message", "a prompt must end with a user (or tool) turn")
    sample["messages"] = messages
    return sample


class PromptIterDataset(grain.IterDataset):
    """Tokenized prompts ``{"prompt_tokens", "messages", "tools", "domain", "meta"}``, one per record."""

    def __init__(self, parent: grain.IterDataset, tokenizer: ChatTokenizer, cfg: PromptConfig):
        super().__init__(parent)
        self.tokenizer, self.cfg = tokenizer, cfg

    def __iter__(self) -> "_PromptIterator":
        pass_info = getattr(self._parent, "pass_info", None)
        return _PromptIterator(self._parent.__iter__(), self.tokenizer, self.cfg, pass_info and pass_info())


class _PromptIterator(grain.DatasetIterator):
    def __init__(self, parent, tokenizer: ChatTokenizer, cfg: PromptConfig, pass_info: dict | None = None):
        super().__init__(parent)
        self._tok, self._cfg = tokenizer, cfg
        self.skips = SkipLog(strict=cfg.strict, log_first=cfg.log_first, what="RL prompt")
        self._start_state = self._parent.get_state()
        self._guard = PassGuard(pass_info, hint="check the files or the prompt format", hints={
            TOO_LONG: "check the files, the prompt format or prompts.max_prompt_len"})

    def _skip(self, loc: str, reason: str, detail: str) -> None:
        self.skips.skip(loc, reason, detail)
        self._guard.skipped(reason)

    def __next__(self) -> dict:
        while True:
            rec = next(self._parent)
            try:
                p = prompt_from_record(rec["raw"])
            except BadSample as e:
                self._skip(rec["loc"], e.reason, e.detail)
                continue
            ids = self._tok.encode_prompt(p["messages"], p["tools"], enable_thinking=self._cfg.enable_thinking)
            if len(ids) > self._cfg.max_prompt_len:
                self._skip(rec["loc"], TOO_LONG, f"{len(ids)} prompt tokens > max_prompt_len "
                                                 f"{self._cfg.max_prompt_len}")
                continue
            self._guard.used()
            meta = {**p["meta"], "loc": rec["loc"]}
            return {"prompt_tokens": ids, "messages": p["messages"], "tools": p["tools"],
                    "domain": meta.get("domain", ""), "meta": meta}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skip_counts": dict(self.skips.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skips.counts = {r: state["skip_counts"].get(r, 0) for r in self.skips.counts}
        self._guard.reset(fresh=state["parent"] == self._start_state)


def group(prompts: list[dict], group_size: int) -> dict:
    """P prompts → one step: every field repeated ``group_size`` times in a row, plus ``group_ids``."""
    rep = [p for p in prompts for _ in range(group_size)]
    return {"prompt_tokens": [p["prompt_tokens"] for p in rep],
            "group_ids": np.repeat(np.arange(len(prompts), dtype=np.int32), group_size),
            "messages": [p["messages"] for p in rep], "tools": [p["tools"] for p in rep],
            "domain": [p["domain"] for p in rep], "meta": [p["meta"] for p in rep]}


class RLPrompts:
    """The RL prompt stream for this process; iterate it for prompt groups (one per RL step)."""

    def __init__(self, cfg: PromptConfig, tokenizer: ChatTokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or ChatTokenizer(cfg.tokenizer)
        self.file_skips = SkipLog(strict=cfg.strict, log_first=cfg.log_first, what="file")
        self.sources = active_sources(cfg.sources)
        sources = open_sources(self.sources, self.file_skips)
        shard_index, shard_count = process_shard(cfg.shard_index, cfg.shard_count)
        index = RecordIndex([len(s) for s in sources], [s.weight for s in self.sources], seed=cfg.seed,
                            num_epochs=cfg.num_epochs, shuffle=cfg.shuffle)
        ds = PromptIterDataset(RecordIterDataset(sources, index, start=shard_index, step=shard_count),
                               self.tokenizer, cfg)
        G = cfg.group_size
        self.dataset = ds.batch(cfg.prompts_per_step, drop_remainder=cfg.drop_remainder,
                                batch_fn=lambda ps: group(ps, G))

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def stats(self, iterator: grain.DatasetIterator | None = None) -> dict[str, int]:
        """Skip counts by reason: empty files, plus the prompts skipped so far by ``iterator``."""
        counts = dict(self.file_skips.counts)
        if iterator is not None:
            sum_skip_counts(iterator.get_state(), counts)
        return counts
