"""Random-access record sources over JSONL, Parquet and ArrayRecord files (local paths or globs).

Each source is a Grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``) whose records are
``{"raw": bytes | dict, "loc": "path:line"}``; ``loc`` is what errors and skip logs print. Lines are
1-based; for Parquet and ArrayRecord the number is the 1-based row/record index. Empty files are
listed in ``empty_files`` (the pipeline counts them, or rejects them in strict mode). Sources pickle
without their open file handles, so Grain worker processes can use them.
"""

from __future__ import annotations

import bisect
import glob
import os
from collections.abc import Sequence

import numpy as np

from cascade_jax.data.records import DataError

_CHUNK = 1 << 26


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching each local path or glob; a pattern that matches nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(os.path.expanduser(p), recursive=True)) if glob.has_magic(p) else [p]
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"{p}: no such file (expected a JSONL/Parquet/ArrayRecord path or glob)")
        out.extend(hits)
    return out


def _line_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets, lengths, 1-based line numbers) of the non-blank lines of a file."""
    starts, ends = [np.zeros(1, np.int64)], []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while chunk := f.read(_CHUNK):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + base
            ends.append(nl)
            starts.append(nl + 1)
            base += len(chunk)
    starts_a = np.concatenate(starts)
    ends_a = np.concatenate(ends + [np.array([size], np.int64)])
    lengths = ends_a - starts_a
    numbers = np.arange(1, len(starts_a) + 1, dtype=np.int64)
    keep = lengths > 0
    if keep.any():  # drop whitespace-only lines (e.g. "\r" or "  ") without reading them all
        short = np.flatnonzero(keep & (lengths <= 4))
        if len(short):
            with open(path, "rb") as f:
                for i in short:
                    f.seek(int(starts_a[i]))
                    if not f.read(int(lengths[i])).strip():
                        keep[i] = False
    return starts_a[keep], lengths[keep], numbers[keep]


class _MultiFile:
    """Concatenation of per-file record readers, with ``path:number`` locations."""

    kind = "records"

    def __init__(self, paths: str | Sequence[str]):
        self.paths = expand_paths(paths)
        counts = [self._open_index(i, p) for i, p in enumerate(self.paths)]
        self.empty_files = [p for p, c in zip(self.paths, counts) if c == 0]
        self._cum = np.cumsum([0] + counts).tolist()

    def __len__(self) -> int:
        return self._cum[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._cum, index) - 1
        return f, index - self._cum[f]

    def __getitem__(self, index: int) -> dict:
        f, i = self._locate(int(index))
        raw, number = self._read(f, i)
        return {"raw": raw, "loc": f"{self.paths[f]}:{number}"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.paths)} files, {len(self)} records)"

    def _open_index(self, i: int, path: str) -> int:
        raise NotImplementedError

    def _read(self, f: int, i: int) -> tuple[bytes | dict, int]:
        raise NotImplementedError


class JsonlSource(_MultiFile):
    """JSON Lines files; blank lines are not records, line numbers count them anyway."""

    def __init__(self, paths: str | Sequence[str]):
        self._index: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._fds: dict[int, int] = {}
        super().__init__(paths)

    def _open_index(self, i: int, path: str) -> int:
        self._index.append(_line_index(path))
        return len(self._index[-1][0])

    def _read(self, f: int, i: int) -> tuple[bytes, int]:
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(self.paths[f], os.O_RDONLY)
        starts, lengths, numbers = self._index[f]
        return os.pread(fd, int(lengths[i]), int(starts[i])), int(numbers[i])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class ParquetSource(_MultiFile):
    """Parquet files with one sample per row (``messages`` as a list column or a JSON string)."""

    def __init__(self, paths: str | Sequence[str]):
        self._groups: list[list[int]] = []
        self._cache: tuple[int, int, list[dict]] | None = None
        super().__init__(paths)

    def _open_index(self, i: int, path: str) -> int:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._groups.append(np.cumsum([0] + sizes).tolist())
        return int(sum(sizes))

    def _read(self, f: int, i: int) -> tuple[dict, int]:
        import pyarrow.parquet as pq

        bounds = self._groups[f]
        g = bisect.bisect_right(bounds, i) - 1
        if self._cache is None or self._cache[:2] != (f, g):
            rows = pq.ParquetFile(self.paths[f]).read_row_group(g).to_pylist()
            self._cache = (f, g, rows)
        row = dict(self._cache[2][i - bounds[g]])
        return row, i + 1

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


class ArrayRecordSource(_MultiFile):
    """ArrayRecord files whose records are UTF-8 JSON objects."""

    def __init__(self, paths: str | Sequence[str]):
        self._readers: dict[int, object] = {}
        super().__init__(paths)

    def _reader(self, f: int):
        from array_record.python import array_record_data_source as ards

        if f not in self._readers:
            self._readers[f] = ards.ArrayRecordDataSource([self.paths[f]])
        return self._readers[f]

    def _open_index(self, i: int, path: str) -> int:
        return len(self._reader(i))

    def _read(self, f: int, i: int) -> tuple[bytes, int]:
        return self._reader(f)[i], i + 1

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state


def open_source(paths: str | Sequence[str]) -> _MultiFile:
    """A source for the files (one format per source, chosen by extension)."""
    files = expand_paths(paths)
    exts = {os.path.basename(p).split(".", 1)[-1] if "." in os.path.basename(p) else "" for p in files}
    if exts <= {"jsonl", "json", "jsonl.txt", "ndjson"}:
        return JsonlSource(files)
    if exts <= {"parquet"}:
        return ParquetSource(files)
    if all(".array_record" in os.path.basename(p) or ".arecord" in os.path.basename(p) for p in files):
        return ArrayRecordSource(files)
    raise DataError(f"{files[0]}: cannot tell the format of {sorted(exts)} (expected .jsonl, .parquet or "
                    ".array_record files, one format per source)")
