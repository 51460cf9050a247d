"""Packing documents into fixed-length rows, in the design's packed-batch format.

Online bin packing with the semantics of Grain's ``FirstFitPackIterDataset`` /
``BestFitPackIterDataset`` (``num_bins`` open rows; a document goes to the first row it fits in, or
the row it fills most tightly; when it fits in none, all open rows are emitted in a seeded random
order and a new group starts with it), reimplemented with whole-row numpy ops because Grain's
per-document tree bookkeeping cost more than tokenizing on short documents. Rows::

    tokens, targets, loss_mask, segment_ids, positions   # int32 [T], T = max_len

``segment_ids`` number a row's documents 1..n (0 = padding); ``positions`` restart at 0 in each
document; padding has tokens = targets = loss_mask = 0. ``max_docs_per_row`` caps documents per row.

State: the parent's state before the group's first document, rows of the group already emitted,
and the group counter; restoring re-packs that group from the parent, so the rows that follow are
exactly those of an uninterrupted run. At the end of a finite stream ``next`` raises
``StopIteration`` (again on every later call) and the state is that of the end: restoring it in a
new iterator gives ``StopIteration`` too.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
ALGORITHMS = ("first_fit", "best_fit")


def build_row(docs: list[dict], max_len: int) -> dict[str, np.ndarray]:
    """One packed row from documents whose lengths sum to at most ``max_len``."""
    lengths = np.fromiter((len(d["tokens"]) for d in docs), np.int64, len(docs))
    n = int(lengths.sum())
    row = {k: np.zeros(max_len, np.int32) for k in FIELDS}
    for k in ("tokens", "targets", "loss_mask"):
        np.concatenate([d[k] for d in docs], out=row[k][:n], casting="unsafe")
    row["segment_ids"][:n] = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), lengths)
    starts = np.cumsum(lengths) - lengths
    row["positions"][:n] = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    return row


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, *, max_len: int, num_bins: int = 16,
                 algorithm: str = "first_fit", max_docs_per_row: int | None = None,
                 shuffle_rows: bool = True, seed: int = 0):
        super().__init__(parent)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"packing={algorithm!r}, expected one of {ALGORITHMS}")
        self.options = dict(max_len=max_len, num_bins=num_bins, algorithm=algorithm,
                            max_docs=max_docs_per_row or max_len, shuffle_rows=shuffle_rows, seed=seed)

    def __iter__(self) -> "_PackIterator":
        return _PackIterator(self._parent.__iter__(), **self.options)

    def __str__(self) -> str:
        return f"PackIterDataset({self.options['algorithm']}, max_len={self.options['max_len']})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, *, max_len, num_bins, algorithm, max_docs, shuffle_rows, seed):
        super().__init__(parent)
        self._max_len, self._num_bins, self._best = max_len, num_bins, algorithm == "best_fit"
        self._max_docs, self._shuffle, self._seed = max_docs, shuffle_rows, seed
        self._group_state = self._parent.get_state()  # parent state before the current group
        self._next_state = None  # parent state before the carried document
        self._carry: dict | None = None
        self._rows: list[list[dict]] = []
        self._order: list[int] = []
        self._emitted = 0
        self._group = 0
        self._done = False

    def _fill_group(self) -> None:
        bins: list[list[dict]] = [[] for _ in range(self._num_bins)]
        free = np.full(self._num_bins, self._max_len, np.int64)
        ndocs = np.zeros(self._num_bins, np.int64)
        while True:
            if self._carry is not None:
                doc, self._carry = self._carry, None
            else:
                before = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:  # the next "group" starts (and ends) at the end of the stream
                    self._done, self._next_state = True, self._parent.get_state()
                    break
            n = len(doc["tokens"])
            if n > self._max_len:
                raise ValueError(f"document of {n} tokens > max_len {self._max_len} reached the packer")
            fits = np.flatnonzero((free >= n) & (ndocs < self._max_docs))
            if not len(fits):
                self._carry, self._next_state = doc, before
                break
            b = int(fits[np.argmin(free[fits])]) if self._best else int(fits[0])
            bins[b].append(doc)
            free[b] -= n
            ndocs[b] += 1
        self._rows = [b for b in bins if b]
        order = np.arange(len(self._rows))
        if self._shuffle:
            order = np.random.default_rng([self._seed, self._group]).permutation(order)
        self._order = order.tolist()
        self._emitted = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted >= len(self._rows):
            if self._rows:  # the previous group is finished: the next one starts at the carried doc
                self._group += 1
                self._group_state = self._next_state
                self._rows, self._emitted = [], 0
            if self._done and self._carry is None:
                raise StopIteration
            self._fill_group()
            if not self._rows:
                raise StopIteration
        row = build_row(self._rows[self._order[self._emitted]], self._max_len)
        self._emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._group_state, "emitted": self._emitted, "group": self._group}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._group_state, self._group = state["parent"], int(state["group"])
        self._carry, self._next_state, self._done = None, None, False
        self._rows, self._order, self._emitted = [], [], 0
        if state["emitted"]:
            self._fill_group()
            self._emitted = int(state["emitted"])


def pack_documents(docs: grain.IterDataset, *, max_len: int, algorithm: str = "first_fit",
                   num_bins: int = 16, max_docs_per_row: int | None = None, shuffle_rows: bool = True,
                   seed: int = 0) -> grain.IterDataset:
    """Rows of ``max_len`` tokens packed from ``docs`` (see the module docstring)."""
    return PackIterDataset(docs, max_len=max_len, num_bins=num_bins, algorithm=algorithm,
                           max_docs_per_row=max_docs_per_row, shuffle_rows=shuffle_rows, seed=seed)
