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
import threading
from typing import Any

import grain
import numpy as np

from cascade_jax.data import chat_template as ct
from cascade_jax.data.records import BAD_MESSAGE, NOTHING_TO_TRAIN, TOO_LONG, BadSample, PassGuard, SkipLog, chat_sample
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
        # The record stream says how long one pass over its records is (after any worker slicing).
        pass_info = getattr(self._parent, "pass_info", None)
        return _DocumentIterator(self._parent.__iter__(), self.tokenizer, pass_info=pass_info and pass_info(),
                                 **self.options)

    def __str__(self) -> str:
        return "DocumentIterDataset"


class _Job:
    """One call of ``fn`` in a daemon thread. ``result()`` waits for it (a signal handler's exception
    still interrupts the wait) and returns its value or raises its exception; nothing ever joins the
    thread, so closing an iterator or exiting never waits on a slow read."""

    def __init__(self, fn):
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name="cascade-tokenize", daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer by result()
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _DocumentIterator(grain.DatasetIterator):
    def __init__(self, parent, tokenizer: ChatTokenizer, *, max_len, too_long, loss_on, strict,
                 chunk_size, log_first, background, pass_info=None):
        super().__init__(parent)
        self._tok = tokenizer
        self._max_len, self._too_long, self._loss_on = max_len, too_long, loss_on
        self._chunk_size = chunk_size
        self.skips = SkipLog(strict=strict, log_first=log_first, what="SFT sample")
        self.truncated = 0
        self.documents = 0  # made by this iterator (not part of the state)
        self._buf: list[dict] = []
        self._pos = 0
        self._chunk_state = self._start_state = self._parent.get_state()
        self._chunk_counts = self._counts()
        self._guard = PassGuard(pass_info, hints={
            TOO_LONG: "check the files, the chat format or data.max_len (too_long: drop skips longer samples)"})
        # A background thread prepares the next chunk (parse, render, tokenize: the tokenizer releases
        # the GIL) while this one packs; chunks are still made strictly one after another.
        self._background = background
        self._job: _Job | None = None

    def _counts(self) -> dict[str, int]:
        return {**self.skips.counts, "truncated": self.truncated}

    def _next_chunk(self):
        if not self._background:
            return self._prepare()
        job = self._job or _Job(self._prepare)
        self._job = job
        result = job.result()  # an interrupted wait leaves the job in place for the next call
        self._job = _Job(self._prepare) if result[1] is not None else None
        return result

    def __next__(self) -> dict:
        while self._pos >= len(self._buf):
            state, chunk = self._next_chunk()
            if chunk is None:  # the end of a finite stream: the state becomes the end's
                self._chunk_state, self._chunk_counts, self._buf, self._pos = state, self._counts(), [], 0
                raise StopIteration
            self._use(state, chunk)
        doc = self._buf[self._pos]
        self._pos += 1
        return doc

    def _use(self, state, chunk) -> None:
        """Makes a prepared chunk current: counts (and logs, or in strict mode raises on) its skips, and
        raises ``DataError`` when a whole pass over the records has yielded no document."""
        docs, outcomes, truncated = chunk
        self._chunk_state, self._chunk_counts = state, self._counts()
        for event in outcomes:  # one per record, in record order: None = it became a document
            if event is None:
                self._guard.used()
            else:
                self.skips.skip(*event)
                self._guard.skipped(event[1])
        self.truncated += truncated
        self.documents += len(docs)
        self._buf, self._pos = docs, 0

    def _prepare(self):
        """Reads, parses, renders and tokenizes the next chunk; touches no counters (thread-safe)."""
        state = self._parent.get_state()
        records = list(itertools.islice(self._parent, self._chunk_size))
        if not records:
            return state, None
        outcomes: list[Any] = [None] * len(records)
        todo, rendered = [], []
        for i, rec in enumerate(records):
            try:
                sample = chat_sample(rec["raw"], need_assistant=True)
                rendered.append(ct.render_pieces(sample["messages"], sample["tools"]))
                todo.append(i)
            except BadSample as e:
                outcomes[i] = (rec["loc"], e.reason, e.detail)
            except (TypeError, AttributeError, KeyError, ValueError) as e:  # odd field types the schema let through
                outcomes[i] = (rec["loc"], BAD_MESSAGE, f"cannot render the conversation: {type(e).__name__}: {e}")
        encoded = self._tok.encode_rendered(rendered, loss_on=self._loss_on) if rendered else []
        docs, truncated = [], 0
        for i, (ids, mask) in zip(todo, encoded):
            doc, event = self._document(records[i]["loc"], ids, mask.astype(np.int32))
            if event == "truncated":
                truncated += 1
            elif event is not None:
                outcomes[i] = event
            if doc is not None:
                docs.append(doc)
        return state, (docs, outcomes, truncated)

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
        if self._job is not None:  # it is reading the parent: let it finish, drop its chunk
            try:
                self._job.result()
            except Exception:  # noqa: BLE001 - an error of a chunk we are discarding
                pass
            self._job = None
        self._parent.set_state(state["parent"])
        counts = dict(state["skip_counts"])
        self.truncated = counts.pop("truncated", 0)
        self.skips.counts = {r: counts.get(r, 0) for r in self.skips.counts}
        self._chunk_state, self._chunk_counts = state["parent"], self._counts()
        self._guard.reset(fresh=state["parent"] == self._start_state and not state["pos"])
        self._buf, self._pos = [], 0
        if state["pos"]:
            chunk_state, chunk = self._prepare()
            if chunk is not None:
                self._use(chunk_state, chunk)
            self._pos = int(state["pos"])

    def close(self) -> None:
        self._job = None  # a chunk in preparation finishes (or not) in its daemon thread, unwaited
        super().close()

    def live_counts(self) -> dict[str, int]:
        """Skip counts including the whole chunk read so far (the state holds them as of chunk start)."""
        return self._counts()
