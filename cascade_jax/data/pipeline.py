"""The SFT data pipeline: records → documents → packed rows → batches, deterministic and resumable.

    data = SFTData(DataConfig(sources=[...], max_len=262144, batch_size=1))
    it = iter(data)                 # a Grain DatasetIterator
    batch = next(it)                # dict of int32 [B, T]: tokens, targets, loss_mask, segment_ids, positions
    state = it.get_state()          # JSON-friendly; goes into the training checkpoint
    it.set_state(state)             # or iter(data) in a new process, then set_state(state)
    data.stats(it)                  # skip counts by reason, plus `truncated`

Stages: ``mixture.RecordIterDataset`` (shuffled, mixed, process-sharded records) →
``documents.DocumentIterDataset`` (parse, render, tokenize in chunks, loss mask, too-long handling,
skip accounting) → ``packing.pack_documents`` → optional ``mp_prefetch`` worker processes (each
works on a slice of the records) → ``batch``. With ``worker_count`` fixed the output depends only on
the config and seed.
"""

from __future__ import annotations

import grain

from cascade_jax.data.config import DataConfig
from cascade_jax.data.documents import DocumentIterDataset, _DocumentIterator
from cascade_jax.data.mixture import RecordIndex, RecordIterDataset, open_sources, process_shard
from cascade_jax.data.packing import pack_documents
from cascade_jax.data.records import EMPTY_FILE, SkipLog, sum_skip_counts
from cascade_jax.data.tokenize import ChatTokenizer


class SFTData:
    """The packed SFT stream for this process; iterate it for batches."""

    def __init__(self, cfg: DataConfig, tokenizer: ChatTokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or ChatTokenizer(cfg.tokenizer)
        self.file_skips = SkipLog(strict=cfg.strict, log_first=cfg.log_first, what="file")
        sources = open_sources(cfg.sources, self.file_skips)
        self.num_records = sum(len(s) for s in sources)
        shard_index, shard_count = process_shard(cfg.shard_index, cfg.shard_count)
        self.index = RecordIndex([len(s) for s in sources], [s.weight for s in cfg.sources], seed=cfg.seed,
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
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                             per_worker_buffer_size=cfg.worker_buffer_size))
        self.dataset = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

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
