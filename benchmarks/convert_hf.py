#!/usr/bin/env python
"""Converter benchmark: peak RSS and throughput of to-jax and to-hf on a synthetic ≥ 4 GB checkpoint.

Builds an HF checkpoint with full nano-30b-a3b widths (vocab 131072, hidden 2688, 128 experts of 1856) and
pattern "ME" in bf16 (A_log, D, router bias F32), sharded at 2 GB, in a temp dir beside --workdir; then
  1. reads those files sequentially (the reference: what the disk/page cache delivers),
  2. copies them once (read + write, no conversion: what moving these bytes costs here, for context),
  3. runs `python -m tools.convert_hf to-jax` and `to-hf` as child processes under /usr/bin/time -v,
and prints each direction's peak RSS and throughput against the raw read (ratio last). Targets: peak RSS
≤ 1.5 GB, throughput ≥ 0.5× the raw read. Everything is deleted at the end.

    .venv/bin/python benchmarks/convert_hf.py [--workdir /tmp] [--pattern ME]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cascade_jax.config import ModelConfig, hf_json_text  # noqa: E402
from cascade_jax.weights.hf_mapping import hf_rules, hf_shapes  # noqa: E402
from cascade_jax.weights.safetensors_writer import ShardedSafetensorsWriter, TensorEntry  # noqa: E402
from cascade_jax.weights.validate import abstract_state  # noqa: E402


def build_checkpoint(directory: Path, config: ModelConfig) -> int:
    """Random bf16 weights (finite: exponent's top bit cleared), written tensor by tensor."""
    rules = hf_rules(config)
    _, flat = abstract_state(config)
    entries = [TensorEntry(name, "F32" if rule.keeps_fp32 else "BF16", shape) for rule in rules
               for name, shape in zip(rule.hf_names, hf_shapes(rule, tuple(flat[rule.path].shape)))]
    writer = ShardedSafetensorsWriter(directory, entries, 2 * 10**9)
    rng = np.random.default_rng(0)
    for entry in entries:
        if entry.dtype == "F32":
            block = rng.standard_normal(entry.shape, np.float32)
        else:
            bits = rng.integers(0, 2**16, entry.shape, dtype=np.uint16) & np.uint16(0xBFFF)
            block = bits.view(ml_dtypes.bfloat16)
        writer.write(entry.name, block)
    writer.close()
    (directory / "config.json").write_text(hf_json_text(config.to_hf()))
    return sum(e.nbytes for e in entries)


def raw_read(directory: Path) -> float:
    """Seconds to read every file of `directory` sequentially in 64 MB blocks."""
    buffer = bytearray(64 * 2**20)
    start = time.perf_counter()
    for file in sorted(directory.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def plain_copy(directory: Path, target: Path) -> float:
    """Seconds to copy every file of `directory` to `target` in 64 MB blocks and fsync it, as the converter
    does before its final rename: what reading and durably writing the same bytes costs on this machine,
    with no conversion (context for the ratios, not the target)."""
    target.mkdir()
    buffer = bytearray(64 * 2**20)
    start = time.perf_counter()
    for file in sorted(directory.iterdir()):
        with open(file, "rb", buffering=0) as source, open(target / file.name, "wb", buffering=0) as out:
            while count := source.readinto(buffer):
                out.write(memoryview(buffer)[:count])
            os.fsync(out.fileno())
    return time.perf_counter() - start


def run_child(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, converter summary line) of `python -m tools.convert_hf ARGS`."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "tools.convert_hf", *args, "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = next(line for line in done.stderr.splitlines() if line.startswith(args[0] + ":"))
    return wall, peak_kb / 2**20, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--pattern", default="ME")
    args = parser.parse_args()
    config = ModelConfig.preset("nano-30b-a3b").replace(layer_pattern=args.pattern)
    free = shutil.disk_usage(args.workdir).free
    need = 3.3 * sum(config.block_num_params(c) for c in args.pattern) * 2 + 3 * 2 * config.vocab_size * 2688 * 2
    if free < need:
        raise SystemExit(f"{args.workdir}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")
    root = Path(tempfile.mkdtemp(prefix="convert_hf_bench-", dir=args.workdir))
    try:
        hf, ckpt, back = root / "hf", root / "ckpt", root / "back"
        hf.mkdir()
        total = build_checkpoint(hf, config)
        print(f"synthetic checkpoint: pattern {args.pattern!r}, {total / 1e9:.2f} GB in "
              f"{len(list(hf.glob('*.safetensors')))} files")
        os.sync()   # every step starts with no dirty pages left by the previous one (steps are not charged
        # for another's write-back; the kernel throttles writers once a few GB are dirty)
        raw_read(hf)                                   # warm the page cache like the converter will find it
        raw = total / 1e9 / raw_read(hf)
        print(f"raw sequential read: {raw:.2f} GB/s")
        copy = total / 1e9 / plain_copy(hf, root / "copy")
        shutil.rmtree(root / "copy")
        os.sync()
        print(f"plain copy of the same files (read + write + fsync, no conversion): {copy:.2f} GB/s = {copy / raw:.2f}x raw read")
        for label, child_args in (("to-jax", ["to-jax", "--hf", str(hf), "--out", str(ckpt)]),
                                  ("to-hf", ["to-hf", "--ckpt", str(ckpt), "--out", str(back),
                                             "--max-shard-size", "2GB"])):
            os.sync()
            wall, peak, summary = run_child(child_args)
            inner = float(re.search(r"\(([\d.]+) GB/s\)", summary).group(1))
            end_to_end = total / 1e9 / wall
            print(f"{label}: peak RSS {peak:.2f} GB (target <= 1.5) | {summary.split(' -> ')[0]} | "
                  f"end to end incl. startup {end_to_end:.2f} GB/s | ratio vs raw read: "
                  f"{inner / raw:.2f}x conversion, {end_to_end / raw:.2f}x end to end (target >= 0.5); "
                  f"vs plain copy {inner / copy:.2f}x")
        same = all((hf / f.name).read_bytes() == f.read_bytes() for f in back.glob("*.safetensors")) and \
            len(list(back.glob("*.safetensors"))) == len(list(hf.glob("*.safetensors")))
        print(f"round trip files byte-identical: {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
