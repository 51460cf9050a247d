"""The SFT data pipeline: records → documents → packed rows → batches, deterministic and resumable.

    data = SFTData(DataConfig(sources=[...], max_len=262144, batch_size=1))
    it = iter(data)                 # a Grain DatasetIterator
    batch = next(it)                # dict of int32 [B, T]: tokens, targets, loss_mask, segment_ids, positions
    state = it.get_state()          # JSON-friendly; goes into the training checkpoint
    it.set_state(state)             # or iter(data) in a new process, then set_state(state)
    data.stats(it)                  # skip counts by reason, plus `truncated`
    data.describe(it)               # one line: sources, records, epochs, skips (for logs)
    it.close()                      # stops worker processes (also done on garbage collection / exit)

Stages: ``mixture.RecordIterDataset`` (shuffled, mixed, process-sharded records) →
``documents.DocumentIterDataset`` (parse, render, tokenize in chunks, loss mask, too-long handling,
skip accounting) → ``packing.pack_documents`` → optional ``mp_prefetch`` worker processes (each
works on a slice of the records) → ``batch``. With ``worker_count`` fixed the output depends only on
the config and seed.

Ends and errors: a finite stream (``num_epochs`` set) ends with a plain ``StopIteration`` from
``next`` (on every later call too), and ``get_state`` still works; an exception raised by a signal
handler while ``next`` waits for data propagates at once (worker processes ignore SIGINT, so Ctrl-C
reaches only the main process) and ``close()`` (or garbage collection, or exit) stops them at once. A whole pass over the records
that yields no usable sample raises ``DataError`` (also from a worker process). Bad values in the
config raise ``ValueError("data.<field>: …")`` when the ``DataConfig`` is built.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import signal
import sys
import threading
import time

import grain

from cascade_jax.data.config import DataConfig
from cascade_jax.data.documents import DocumentIterDataset, _DocumentIterator
from cascade_jax.data.mixture import RecordIndex, RecordIterDataset, active_sources, open_sources, process_shard
from cascade_jax.data.packing import pack_documents
from cascade_jax.data.records import EMPTY_FILE, SkipLog, sum_skip_counts
from cascade_jax.data.tokenize import ChatTokenizer

_GRAIN_WORKER_NAME = "grain-process-prefetch"


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each Grain worker process: Ctrl-C (SIGINT to the whole process group) is for the main
    process, which stops the workers; left alone, every worker would die printing a traceback."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_worker_processes(known_before: set, timeout: float = 2.0) -> int:
    """Terminates the live Grain worker processes started since ``known_before``; returns how many.

    Grain's own ``close`` first waits for every worker to finish the element it is making (a worker
    checks for the stop request only between elements; the prefetch thread in front of it waits for
    that element), which on a stalled source is unbounded. A terminated worker is seen as failed at
    once, so Grain's ``close`` that follows returns within about a second. Grain keeps no public
    handle on its workers and starts them from its own threads too: they are found by name.
    """
    alive = [p for p in multiprocessing.active_children()
             if p not in known_before and p.name.startswith(_GRAIN_WORKER_NAME)]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    return len(alive)


class _WorkerPoolIterator(grain.DatasetIterator):
    """The batches of a pipeline with worker processes; ``close()`` (also on garbage collection and at
    exit) stops its workers at once, even in the middle of an element."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._known_before = set(multiprocessing.active_children())  # Grain starts the workers lazily
        self._stop_at_exit = multiprocessing.util.Finalize(self, stop_worker_processes,
                                                           args=(self._known_before,), exitpriority=10)

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        if self._closed:
            return
        self._stop_at_exit.cancel()
        if sys.is_finalizing():  # collected at exit: no new threads, and nothing waits on a signal now
            stop_worker_processes(self._known_before)
            super().close()
            return
        # Closing can itself start a worker that a signal kept from starting (Grain's prefetch thread
        # asks for its element): stop them until Grain's close returns.
        closed = threading.Event()
        reaper = threading.Thread(target=self._reap_until, args=(closed,), name="cascade-data-reaper", daemon=True)
        reaper.start()
        try:
            super().close()
        finally:
            closed.set()
            reaper.join()

    def _reap_until(self, closed: threading.Event) -> None:
        stop_worker_processes(self._known_before)
        while not closed.wait(0.1):
            stop_worker_processes(self._known_before)
        stop_worker_processes(self._known_before)

    def __str__(self) -> str:
        return "WorkerPoolIterator"


class SFTData:
    """The packed SFT stream for this process; iterate it for batches.

    ``sources`` (the configs of the sources in use, weight > 0), ``source_records`` (records per
    source), ``num_records`` (their sum) and ``records_per_epoch`` (this process's share, draws of
    one epoch) describe the data without reading it; ``describe()`` says it in one line.
    """

    def __init__(self, cfg: DataConfig, tokenizer: ChatTokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or ChatTokenizer(cfg.tokenizer)
        self.file_skips = SkipLog(strict=cfg.strict, log_first=cfg.log_first, what="file")
        self.sources = active_sources(cfg.sources)
        sources = open_sources(self.sources, self.file_skips)
        self.source_records = [len(s) for s in sources]
        self.num_records = sum(self.source_records)
        shard_index, shard_count = process_shard(cfg.shard_index, cfg.shard_count)
        self.shard = (shard_index, shard_count)
        self.records_per_epoch = -(-(self.num_records - shard_index) // shard_count)
        self.index = RecordIndex(self.source_records, [s.weight for s in self.sources], seed=cfg.seed,
                                 num_epochs=cfg.num_epochs, shuffle=cfg.shuffle)
        self.records = RecordIterDataset(sources, self.index, start=shard_index, step=shard_count,
                                         chunk=cfg.tokenize_chunk)
        ds = self.records
        ds = DocumentIterDataset(ds, self.tokenizer, max_len=cfg.max_len, too_long=cfg.too_long,
                                 loss_on=cfg.loss_on, strict=cfg.strict, chunk_size=cfg.tokenize_chunk,
                                 log_first=cfg.log_first, background=cfg.tokenize_in_background)
        ds = pack_documents(ds, max_len=cfg.max_len, algorithm=cfg.packing, num_bins=cfg.num_packing_bins,
                            max_docs_per_row=cfg.max_docs_per_row, shuffle_rows=cfg.shuffle_rows,
                            seed=cfg.seed)
        if cfg.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults suffice)
                flags.FLAGS.mark_as_parsed()
        self._rows = ds
        self.dataset = self._batches()

    def _batches(self) -> grain.IterDataset:
        ds, cfg = self._rows, self.cfg
        if cfg.worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                             per_worker_buffer_size=cfg.worker_buffer_size),
                                worker_init_fn=_worker_init)
        return ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)

    def __iter__(self) -> grain.DatasetIterator:
        if self.cfg.worker_count == 0:
            return iter(self.dataset)
        return _WorkerPoolIterator(iter(self.dataset))

    def stats(self, iterator: grain.DatasetIterator | None = None) -> dict[str, int]:
        """Skip counts by reason (plus ``truncated``): empty files, and the documents read by ``iterator``.

        In-process iterators report live counts; with worker processes the counts come from the
        iterator state, i.e. as of the start of each worker's current packing group.
        """
        counts = {EMPTY_FILE: self.file_skips.counts[EMPTY_FILE]}
        if iterator is None:
            return counts
        live, stack = [], [iterator]
        while stack:
            node = stack.pop()
            if isinstance(node, _DocumentIterator):
                live.append(node)
            stack.extend(getattr(node, "_parents", ()))
        if live:
            for node in live:
                for reason, n in node.live_counts().items():
                    counts[reason] = counts.get(reason, 0) + n
        else:
            sum_skip_counts(iterator.get_state(), counts)
        return counts

    def describe(self, iterator: grain.DatasetIterator | None = None) -> str:
        """One line for logs, e.g. when the stream ends: ``3000 records in 1 source (tiny-sft: 3000);
        3000 per epoch for this process, num_epochs=1 → 3000 in all; skipped 0``."""
        names = ", ".join(f"{s.name}: {n}" for s, n in zip(self.sources, self.source_records))
        plural = "" if len(self.sources) == 1 else "s"
        shard = "this process" if self.shard[1] == 1 else f"process {self.shard[0]} of {self.shard[1]}"
        epochs = self.cfg.num_epochs
        length = "repeated forever" if epochs is None else f"num_epochs={epochs:g} → {len(self.records)} in all"
        line = (f"{self.num_records} records in {len(self.sources)} source{plural} ({names}); "
                f"{self.records_per_epoch} per epoch for {shard}, {length}")
        if iterator is not None:
            counts = self.stats(iterator)
            truncated = counts.pop("truncated", 0)
            skipped = {r: n for r, n in counts.items() if n}
            line += f"; skipped {sum(skipped.values())}" + (
                " (" + ", ".join(f"{r}: {n}" for r, n in skipped.items()) + ")" if skipped else "")
            if truncated:
                line += f"; truncated {truncated}"
        return line
