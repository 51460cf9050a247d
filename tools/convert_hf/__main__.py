"""python -m tools.convert_hf to-jax --hf HF_DIR --out CKPT_DIR | to-hf --ckpt CKPT_DIR --out HF_DIR"""

from __future__ import annotations

import argparse
import os
import re
import sys

# Conversion runs on the host with numpy and TensorStore; keep JAX (imported for the model's shapes) off
# any accelerator. Must happen before JAX creates its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_jax = commands.add_parser("to-jax", help="HF safetensors directory -> Orbax checkpoint")
    to_jax.add_argument("--hf", required=True, help="HF directory: config.json + safetensors (+ index)")
    to_jax.add_argument("--out", required=True, help="checkpoint directory to create")
    to_jax.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="parameter dtype (default: the checkpoint's); A_log, D, router bias stay float32")
    to_hf = commands.add_parser("to-hf", help="Orbax checkpoint (converted or trained) -> HF directory")
    to_hf.add_argument("--ckpt", required=True, help="directory written by to-jax, or a trainer checkpoint")
    to_hf.add_argument("--out", required=True, help="HF directory to create")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    to_hf.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                       help="output dtype (default: the checkpoint's); A_log, D, router bias stay F32")
    for command in (to_jax, to_hf):
        command.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        command.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import absl.logging  # orbax logs through absl; keep the terminal to our bar and summary

    absl.logging.set_verbosity(absl.logging.ERROR)
    dtype = _np_dtype(args.dtype)
    try:
        if args.command == "to-jax":
            from tools.convert_hf.to_jax import convert_to_jax

            summary = convert_to_jax(args.hf, args.out, dtype=dtype, overwrite=args.overwrite,
                                     progress=not args.no_progress)
        else:
            from tools.convert_hf.to_hf import convert_to_hf

            summary = convert_to_hf(args.ckpt, args.out, max_shard_bytes=args.max_shard_size,
                                    dtype=dtype, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError) as e:   # CheckpointError and ConfigError are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary, file=sys.stderr)
    return 0


def _np_dtype(name):
    if name is None:
        return None
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
