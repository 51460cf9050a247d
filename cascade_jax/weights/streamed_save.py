"""Save an Orbax PyTree whose leaves are produced block by block, so no leaf is ever whole in memory.

Orbax writes each leaf from one in-memory array; for a 1.28 GB expert stack that array is the memory
bound. Here a leaf is a `StreamedArray` (shape, dtype, and a function returning rows [start, stop) along
one axis). A TypeHandler, Orbax's extension point for leaf types, writes it with TensorStore one block at
a time into the array spec Orbax builds itself, with storage chunks that split only that axis (so a block
covers whole chunks and TensorStore never holds a partial one). The handler reports the leaf as an
`np.ndarray`, so the result is an ordinary Orbax checkpoint that Orbax restores with its standard handlers.

Blocks are read on a small thread pool while TensorStore writes earlier ones; at most `slots` blocks are
in memory at once, across all leaves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

CHUNK_BYTES = 16 * 2**20    # storage chunk: also the read granularity of a later sharded load
BLOCK_BYTES = 64 * 2**20    # what one read produces and one write consumes


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
    """A leaf given by `read(start, stop, out)`, which fills `out` with its rows [start, stop) along `axis`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int
    read: Callable[[int, int, np.ndarray], None]
    written: Callable[[int, int], None] | None = None   # called (in order per leaf) once rows are stored

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def _rows(self) -> int:
        return self.shape[self.axis] if self.shape else 1

    def _row_bytes(self) -> int:
        return self.nbytes // max(self._rows(), 1)

    def chunk_shape(self) -> tuple[int, ...]:
        """Whole along every axis but `axis`; along it, the largest power of two within CHUNK_BYTES."""
        if not self.shape:
            return ()
        rows = 1 << max(0, (CHUNK_BYTES // max(self._row_bytes(), 1)).bit_length() - 1)
        return tuple(min(rows, n) if i == self.axis else n for i, n in enumerate(self.shape))

    def blocks(self) -> list[tuple[int, int]]:
        return block_ranges(self._rows(), self._row_bytes(), self.chunk_shape()[self.axis] if self.shape else 1)

    def block_shape(self, start: int, stop: int) -> tuple[int, ...]:
        return tuple(stop - start if i == self.axis else n for i, n in enumerate(self.shape))

    def index(self, start: int, stop: int) -> tuple[slice, ...]:
        return tuple(slice(start, stop) if i == self.axis else slice(None) for i in range(self.ndim))


def block_ranges(rows: int, row_bytes: int, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about BLOCK_BYTES, made of whole storage chunks when a chunk fits."""
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    if chunk_rows <= step:
        step -= step % chunk_rows
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def save_streamed(directory: str | os.PathLike, tree: dict, *, slots: int = 4, threads: int = 2) -> None:
    """Write `tree` (nested dicts of StreamedArray) as an Orbax PyTree checkpoint at `directory`."""
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streamed-read") as pool:
        handler = _StreamedArrayHandler(pool, slots)
        registry = ocp.type_handlers.create_type_handler_registry((StreamedArray, handler))
        # Weights barely compress; zstd would only cost CPU time and per-chunk buffers.
        pytree = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False,
                                             type_handler_registry=registry)
        with ocp.Checkpointer(pytree) as checkpointer:
            checkpointer.save(os.fspath(directory), args=ocp.args.PyTreeSave(tree))


def _chunked(tspec: dict, chunk_shape: tuple[int, ...]) -> dict:
    """Orbax's zarr3 write spec with our chunk shape (Orbax's own choice splits the largest axis first)."""
    if tspec.get("driver") != "zarr3":
        raise ValueError(f"expected a zarr3 spec from Orbax, got driver {tspec.get('driver')!r}")
    metadata = dict(tspec["metadata"])
    metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}}
    sharding, *rest = metadata["codecs"]
    configuration = dict(sharding["configuration"], chunk_shape=list(chunk_shape))
    metadata["codecs"] = [dict(sharding, configuration=configuration), *rest]
    return dict(tspec, metadata=metadata)


def _unsynced(tspec: dict) -> dict:
    """Write through the page cache, without an fsync per chunk (Orbax's default for training checkpoints).

    A conversion is re-run, not recovered, after a crash; per-chunk fsyncs bound it by the disk's sync
    write speed instead of the copy. Like transformers' safetensors writes, the data reaches disk later.
    """
    kvstore = dict(tspec["kvstore"])
    for part in ("base", "manifest"):
        if isinstance(kvstore.get(part), dict) and kvstore[part].get("driver") == "file":
            kvstore[part] = dict(kvstore[part], file_io_sync=False)
    return dict(tspec, kvstore=kvstore)


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """NumpyHandler whose write step pulls blocks from a StreamedArray instead of writing one array.

    Each of the `slots` owns a buffer that blocks are read into and that TensorStore copies from; reusing
    them matters: faulting in fresh pages for every block cost as much as the copies themselves.
    """

    def __init__(self, pool: concurrent.futures.Executor, slots: int):
        super().__init__(deepcopy_host_arrays=False)
        self._pool = pool
        self._buffers = [np.empty(0, np.uint8) for _ in range(slots)]
        self._free = None   # asyncio queue of buffer indices, made inside Orbax's event loop

    async def _open_and_write(self, value: StreamedArray, tspec: dict, ts_context) -> None:
        if self._free is None:
            self._free = asyncio.Queue()
            for slot in range(len(self._buffers)):
                self._free.put_nowait(slot)
        store = await ts.open(ts.Spec(_unsynced(_chunked(tspec, value.chunk_shape()))), create=True, open=True,
                              context=ts_context)
        blocks = [asyncio.ensure_future(self._write_block(store, value, start, stop))
                  for start, stop in value.blocks()]
        try:
            for task, (start, stop) in zip(blocks, value.blocks()):
                await task
                if value.written is not None:
                    value.written(start, stop)
        finally:
            for task in blocks:
                task.cancel()

    async def _write_block(self, store, value: StreamedArray, start: int, stop: int) -> None:
        slot = await self._free.get()
        try:
            out = self._view(slot, value.block_shape(start, stop), np.dtype(value.dtype))
            await asyncio.get_running_loop().run_in_executor(self._pool, value.read, start, stop, out)
            await store[value.index(start, stop)].write(out)
        finally:
            self._free.put_nowait(slot)

    def _view(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buffers[slot].size < nbytes:
            self._buffers[slot] = np.empty(max(nbytes, BLOCK_BYTES), np.uint8)
        return self._buffers[slot][:nbytes].view(dtype).reshape(shape)
