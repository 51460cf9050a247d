"""Record stream: sources → per-epoch shuffle → weighted mixture → epochs → process/worker slice.

``RecordIndex`` maps a global draw number g to (source, record) with vectorized numpy, so a chunk
of records costs a few array ops instead of per-record Python layers:

- Mixture: draws are cut into blocks of ``block`` draws; block b holds each source s exactly
  ``counts[s]`` times (largest-remainder rounding of ``block × weight``), in a seeded random order.
  The k-th draw of source s is therefore known in closed form, and the proportions are exact per
  block.
- Epochs: the p-th draw of source s reads record ``perm(s, p // n_s)[p % n_s]``, where
  ``perm(s, e)`` is a seeded permutation of that source, new for every epoch (identity without
  shuffle).
- Length: ``floor(num_epochs × total records)`` draws (None: endless).
- Pass: ``pass_length()`` draws from the start read every record of every source at least once;
  ``documents`` / ``prompts`` raise ``DataError`` when a whole pass yields nothing usable.

``RecordIterDataset`` is the Grain source of the pipeline: it reads the draws ``start, start + step,
…`` (``start = process index``, ``step = process count`` for JAX multi-host sharding) and supports
Grain's in-place slicing, so ``mp_prefetch`` workers read disjoint strided slices. Its iterator
state is just the number of draws read.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from cascade_jax.data.config import SourceConfig
from cascade_jax.data.records import EMPTY_FILE, DataError, SkipLog
from cascade_jax.data.sources import open_source


def process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this process's shard: the given values, else JAX's process index and count."""
    if shard_count is not None:
        return int(shard_index), int(shard_count)
    import jax

    return jax.process_index(), jax.process_count()


def active_sources(sources: Sequence[SourceConfig]) -> list[SourceConfig]:
    """The sources that take part in the mixture (weight > 0)."""
    return [s for s in sources if s.weight > 0]


def open_sources(sources: Sequence[SourceConfig], skips: SkipLog) -> list:
    """Opens every source; empty files are counted/logged in ``skips`` (strict: ``DataError``)."""
    out = []
    for s in sources:
        src = open_source(s.paths)
        for path in src.empty_files:
            skips.skip(f"{path}:0", EMPTY_FILE, "the file has no records")
        if len(src) == 0:
            raise DataError(f"{s.paths[0]}: source {s.name!r} has no records at all")
        out.append(src)
    return out


class RecordIndex:
    """Global draw number → (source id, record id); deterministic in ``seed``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int,
                 num_epochs: float | None, shuffle: bool = True, block: int = 4096):
        self.sizes = np.asarray(sizes, np.int64)
        self.seed, self.shuffle = int(seed), shuffle
        if not all(w > 0 for w in weights):
            raise ValueError(f"mixture weights {list(weights)}: expected all > 0 (leave weight-0 sources out)")
        w = np.asarray(weights, np.float64) / np.sum(weights)
        # Big enough that every source gets at least two draws per block.
        self.block = max(block, 8 * len(sizes), math.ceil(2 / w.min()))
        if self.block > 1 << 26:
            raise ValueError(f"mixture weights {list(weights)}: the smallest is too small relative to the others")
        raw = self.block * w
        counts = np.floor(raw).astype(np.int64)
        counts[np.argsort(-(raw - counts), kind="stable")[: self.block - counts.sum()]] += 1
        self.counts = counts
        total = int(self.sizes.sum())
        self.length = None if num_epochs is None else max(1, math.floor(total * num_epochs))
        self._perms: OrderedDict = OrderedDict()
        self._blocks: OrderedDict = OrderedDict()

    def pass_length(self) -> int:
        """Draws from the start that read every record of every source at least once (one pass)."""
        if len(self.sizes) == 1:
            return int(self.sizes[0])
        last = 0
        for s, (size, count) in enumerate(zip(self.sizes.tolist(), self.counts.tolist())):
            b, r = divmod(size - 1, count)  # the draw of the source's last record of epoch 0
            order, _ = self._block(b)
            last = max(last, b * self.block + int(np.flatnonzero(order == s)[r]))
        return last + 1

    def _cached(self, cache: OrderedDict, key, make):
        if key not in cache:
            cache[key] = make()
            if len(cache) > 4:
                cache.popitem(last=False)
        return cache[key]

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        def make():
            order = np.repeat(np.arange(len(self.counts)), self.counts)
            order = np.random.default_rng([self.seed, 1, b]).permutation(order)
            rank = np.empty(len(order), np.int64)  # how many earlier draws of the same source in the block
            for s in range(len(self.counts)):
                where = np.flatnonzero(order == s)
                rank[where] = np.arange(len(where))
            return order, rank
        return self._cached(self._blocks, b, make)

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        dtype = np.int32 if self.sizes[s] < 2**31 else np.int64
        return self._cached(self._perms, (s, epoch), lambda: np.random.default_rng(
            [self.seed, 2, s, epoch]).permutation(self.sizes[s]).astype(dtype))

    def lookup(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, np.int64)
        if len(self.sizes) == 1:
            src, p = np.zeros_like(g), g
        else:
            src, p = np.empty_like(g), np.empty_like(g)
            blocks = g // self.block
            for b in np.unique(blocks):
                sel = blocks == b
                order, rank = self._block(int(b))
                r = g[sel] - b * self.block
                src[sel] = order[r]
                p[sel] = b * self.counts[order[r]] + rank[r]
        rec = p % self.sizes[src]
        if self.shuffle:
            epoch = p // self.sizes[src]
            for s, e in set(zip(src.tolist(), epoch.tolist())):
                sel = (src == s) & (epoch == e)
                rec[sel] = self._perm(s, e)[rec[sel]]
        return src, rec


class RecordIterDataset(grain.IterDataset):
    """Raw records ``{"raw", "loc", "source"}`` of draws ``start, start + step, …`` of a ``RecordIndex``."""

    def __init__(self, sources: Sequence, index: RecordIndex, *, start: int = 0, step: int = 1,
                 chunk: int = 256):
        super().__init__()
        self.sources, self.index = list(sources), index
        self.start, self.step, self.chunk = start, step, chunk

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain in-place slicing (used by ``mp_prefetch``): keeps every ``sl.step``-th draw from ``sl.start``."""
        if sl.stop is not None:
            raise ValueError(f"RecordIterDataset supports only open-ended strided slices, got {sl}")
        self.start += self.step * (sl.start or 0)
        self.step *= sl.step or 1

    def pass_info(self) -> dict[str, Any]:
        """What one pass over the records is for this slice (see ``records.PassGuard``)."""
        draws = self.index.pass_length()
        return {"records": max(1, -(-(draws - self.start) // self.step)), "total": int(self.index.sizes.sum()),
                "files": [p for src in self.sources for p in src.paths], "sliced": self.step > 1}

    def __len__(self) -> int:
        if self.index.length is None:
            raise TypeError("the record stream is endless (num_epochs=None)")
        return max(0, -(-(self.index.length - self.start) // self.step))

    def __iter__(self) -> "_RecordIterator":
        return _RecordIterator(self)

    def __str__(self) -> str:
        return f"RecordIterDataset(start={self.start}, step={self.step})"


class _RecordIterator(grain.DatasetIterator):
    def __init__(self, ds: RecordIterDataset):
        super().__init__()
        self._ds = ds
        self._next = 0  # draws of this slice read so far
        self._buf: list[dict] = []
        self._buf_start = 0

    def __next__(self) -> dict:
        k = self._next - self._buf_start
        if not 0 <= k < len(self._buf):
            self._read_chunk()
            k = 0
            if not self._buf:
                raise StopIteration
        self._next += 1
        return self._buf[k]

    def _read_chunk(self) -> None:
        ds = self._ds
        g = ds.start + ds.step * np.arange(self._next, self._next + ds.chunk, dtype=np.int64)
        if ds.index.length is not None:
            g = g[g < ds.index.length]
        self._buf_start, self._buf = self._next, []
        if len(g):
            src, rec = ds.index.lookup(g)
            for s, r in zip(src.tolist(), rec.tolist()):
                item = ds.sources[s][r]
                item["source"] = s
                self._buf.append(item)

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next = int(state["next_index"])
        self._buf, self._buf_start = [], 0

    def __str__(self) -> str:
        return "RecordIterator"
