"""cascade-sft --config configs/sft/tiny.yaml [dotted.key=value ...]"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade-sft", description="Supervised fine-tuning of NemotronH.")
    parser.add_argument("--config", help="YAML recipe, e.g. configs/sft/tiny.yaml")
    parser.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from the newest checkpoint in run_dir (the default when one exists)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from step 0")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-6 train.steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every file it renames at INFO

    from cascade_jax.train.config import RunConfigError, load_sft_config
    from cascade_jax.train.sft import TrainingDiverged, run_sft

    overrides = list(args.overrides) + ([] if args.resume is None else [f"resume={str(args.resume).lower()}"])
    try:
        cfg = load_sft_config(args.config, overrides)
        metrics = run_sft(cfg)
    except (RunConfigError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        print(f"cascade-sft: error: {e}", file=sys.stderr)
        return 1
    print("final: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
