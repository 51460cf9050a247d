"""Records → tokenized training documents, in chunks, with skip accounting and a resumable state.

``DocumentIterDataset`` pulls raw records (``{"raw", "loc"}``) from its parent, parses and renders a
chunk of them, tokenizes the chunk in one ``ChatTokenizer.encode_rendered`` call (one parallel Rust
call; its per-call overhead is paid once per chunk), and emits one document per sample::

    {"tokens": int32 [L], "targets": int32 [L], "loss_mask": int32 [L]}

with ``tokens = ids[:-1]``, ``targets = ids[1:]`` and ``loss_mask[t] = 1`` iff ``targets[t]`` is a
trained assistant token. ``L <= max_len`` always: longer samples are dropped or truncated
(``too_long``) and counted. Bad samples are skipped and counted (``records.SkipLog``), or raise
``DataError`` naming ``file:line`` in strict mode.

State: the parent's state at the start of the current chunk, the position inside the chunk, and
the skip counts at the start of the chunk; restoring re-reads that chunk, so the documents that
follow are exactly the ones an uninterrupted run would have produced. With ``background`` (default)
the next chunk is prepared in a helper thread while the consumer packs the current one; chunks are
still made one after another, so the output and the states are the same either way.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grain
import numpy as np

from cascade_jax.data import chat_template as ct
from cascade_jax.data.records import BAD_MESSAGE, NOTHING_TO_TRAIN, TOO_LONG, BadSample, SkipLog, chat_sample
from cascade_jax.data.tokenize import LOSS_ON, ChatTokenizer

TOO_LONG_MODES = ("drop", "truncate")


class DocumentIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, tokenizer: ChatTokenizer, *, max_len: int,
                 too_long: str = "drop", loss_on: str = "all_assistant", strict: bool = False,
                 chunk_size: int = 256, log_first: int = 5, background: bool = True):
        super().__init__(parent)
        if too_long not in TOO_LONG_MODES:
            raise ValueError(f"too_long={too_long!r}, expected one of {TOO_LONG_MODES}")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}, expected one of {LOSS_ON}")
        self.tokenizer = tokenizer
        self.options = dict(max_len=max_len, too_long=too_long, loss_on=loss_on, strict=strict,
                            chunk_size=chunk_size, log_first=log_first, background=background)

    def __iter__(self) -> "_DocumentIterator":
        return _DocumentIterator(self._parent.__iter__(), self.tokenizer, **self.options)

    def __str__(self) -> str:
        return "DocumentIterDataset"


class _DocumentIterator(grain.DatasetIterator):
    def __init__(self, parent, tokenizer: ChatTokenizer, *, max_len, too_long, loss_on, strict,
                 chunk_size, log_first, background):
        super().__init__(parent)
        self._tok = tokenizer
        self._max_len, self._too_long, self._loss_on = max_len, too_long, loss_on
        self._chunk_size = chunk_size
        self.skips = SkipLog(strict=strict, log_first=log_first, what="SFT sample")
        self.truncated = 0
        self._buf: list[dict] = []
        self._pos = 0
        self._chunk_state = self._parent.get_state()
        self._chunk_counts = self._counts()
        # One background thread prepares the next chunk (parse, render, tokenize: the tokenizer
        # releases the GIL) while this one packs; chunks are still made strictly in order.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cascade-tokenize") if background else None
        self._future: Future | None = None

    def _counts(self) -> dict[str, int]:
        return {**self.skips.counts, "truncated": self.truncated}

    def _next_chunk(self):
        if self._pool is None:
            return self._prepare()
        if self._future is None:
            self._future = self._pool.submit(self._prepare)
        result = self._future.result()
        self._future = self._pool.submit(self._prepare) if result[1] is not None else None
        return result

    def __next__(self) -> dict:
        while self._pos >= len(self._buf):
            state, chunk = self._next_chunk()
            if chunk is None:
                raise StopIteration
            self._use(state, chunk)
        doc = self._buf[self._pos]
        self._pos += 1
        return doc

    def _use(self, state, chunk) -> None:
        """Makes a prepared chunk current: counts (and logs, or in strict mode raises on) its skips."""
        docs, events, truncated = chunk
        self._chunk_state, self._chunk_counts = state, self._counts()
        for loc, reason, detail in events:
            self.skips.skip(loc, reason, detail)
        self.truncated += truncated
        self._buf, self._pos = docs, 0

    def _prepare(self):
        """Reads, parses, renders and tokenizes the next chunk; touches no counters (thread-safe)."""
        state = self._parent.get_state()
        records = list(itertools.islice(self._parent, self._chunk_size))
        if not records:
            return state, None
        locs, rendered, events = [], [], []
        for rec in records:
            try:
                sample = chat_sample(rec["raw"], need_assistant=True)
                rendered.append(ct.render_pieces(sample["messages"], sample["tools"]))
                locs.append(rec["loc"])
            except BadSample as e:
                events.append((rec["loc"], e.reason, e.detail))
            except (TypeError, AttributeError, KeyError, ValueError) as e:  # odd field types the schema let through
                events.append((rec["loc"], BAD_MESSAGE, f"cannot render the conversation: {type(e).__name__}: {e}"))
        encoded = self._tok.encode_rendered(rendered, loss_on=self._loss_on) if rendered else []
        docs, truncated = [], 0
        for loc, (ids, mask) in zip(locs, encoded):
            doc, event = self._document(loc, ids, mask.astype(np.int32))
            if event == "truncated":
                truncated += 1
            elif event is not None:
                events.append(event)
            if doc is not None:
                docs.append(doc)
        return state, (docs, events, truncated)

    def _document(self, loc: str, ids: np.ndarray, mask: np.ndarray) -> tuple[dict | None, Any]:
        """(document or None, None | "truncated" | skip event)."""
        n, event = len(ids) - 1, None
        if n > self._max_len:
            if self._too_long == "drop":
                return None, (loc, TOO_LONG, f"{n + 1} tokens > max_len + 1 = {self._max_len + 1}")
            ids, mask, event = ids[: self._max_len + 1], mask[: self._max_len + 1], "truncated"
        if len(ids) < 2 or not mask[1:].any():
            return None, (loc, NOTHING_TO_TRAIN, "no assistant token to train on (after truncation)")
        return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}, event

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._chunk_state, "pos": self._pos, "skip_counts": dict(self._chunk_counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        if self._future is not None:  # drop the look-ahead chunk (let it finish first: it uses the parent)
            try:
                self._future.result()
            except Exception:  # noqa: BLE001 - a strict-mode error of a chunk we are discarding
                pass
            self._future = None
        self._parent.set_state(state["parent"])
        counts = dict(state["skip_counts"])
        self.truncated = counts.pop("truncated", 0)
        self.skips.counts = {r: counts.get(r, 0) for r in self.skips.counts}
        self._chunk_state, self._chunk_counts = state["parent"], self._counts()
        self._buf, self._pos = [], 0
        if state["pos"]:
            chunk_state, chunk = self._prepare()
            if chunk is not None:
                self._use(chunk_state, chunk)
            self._pos = int(state["pos"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        super().close()

    def live_counts(self) -> dict[str, int]:
        """Skip counts including the whole chunk read so far (the state holds them as of chunk start)."""
        return self._counts()
