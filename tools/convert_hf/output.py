"""What every conversion shares: an output directory that appears whole or not at all, progress, summary."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from cascade_jax.weights.safetensors_dir import CheckpointError


def refuse_overlap(out_dir, inputs) -> None:
    """CheckpointError unless `out_dir` is apart from every input directory: not the same, not inside one,
    not containing one. `inputs`: (description, path), e.g. ("the input --hf /x", "/x"). Paths are
    compared resolved (symlinks followed, missing tails kept as written), so a link is no way around it.
    Called before anything is written: `--overwrite` would otherwise replace the input with the output."""
    out = Path(out_dir).resolve()
    for description, path in inputs:
        source = Path(path).resolve()
        if out == source:
            relation, advice = "is", "choose a directory outside it"
        elif source in out.parents:
            relation, advice = "is inside", "choose a directory outside it"
        elif out in source.parents:
            relation, advice = "contains", "choose a directory that does not contain it"
        else:
            continue
        raise CheckpointError(f"--out {_shown(out_dir, out)} {relation} {description}; {advice}")


def input_dirs(flag: str, path) -> list[tuple[str, Path]]:
    """`path` itself, and the directories its symlinked files point into (an HF hub snapshot's blobs/)."""
    given = Path(path)
    found = [(f"the input {flag} {_shown(path, given.resolve())}", given)]
    if given.is_dir():
        targets = sorted({entry.resolve().parent for entry in given.iterdir() if entry.is_symlink()})
        found += [(f"{target}, which holds files of the input {flag} {path}", target)
                  for target in targets if target != given.resolve()]
    return found


def _shown(given, resolved: Path) -> str:
    """The path as given, with where it resolves to when that differs."""
    return str(given) if Path(os.path.abspath(given)) == resolved else f"{given} (= {resolved})"


@contextlib.contextmanager
def staged_directory(out_dir, overwrite: bool):
    """Yield a temporary directory beside `out_dir`; it becomes `out_dir` only if the block succeeds.

    Same parent, so the final step is a rename (atomic on one file system), and a failure leaves nothing.
    Everything written is flushed to disk before the rename, so a crash never leaves a complete-looking
    directory with missing data (the writes themselves go through the page cache, at memory speed).
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _flush_to_disk(staging)
    if out.exists():   # --overwrite: swap, then remove the old one
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "previous")
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _flush_to_disk(root: Path) -> None:
    """fsync every file, then every directory (deepest first, so new entries are durable too)."""
    folders = [*sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), root]
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclasses.dataclass
class Progress:
    """tqdm bar over bytes (tensors in the postfix) and the totals for the summary line."""

    label: str
    total_tensors: int
    total_bytes: int
    show: bool = True

    def __post_init__(self):
        self.tensors, self.bytes, self.start = 0, 0, time.perf_counter()
        self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc=self.label,
                         disable=not self.show, file=sys.stderr, dynamic_ncols=True)

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        self._bar.update(nbytes)
        self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        self._bar.close()

    def summary(self, destination) -> str:
        self.close()
        seconds = time.perf_counter() - self.start
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e8 else f"{self.bytes / 1e6:.2f} MB"
        return (f"{self.label}: {self.tensors} tensors, {size} in {seconds:.1f} s "
                f"({self.bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s) -> {destination}")
