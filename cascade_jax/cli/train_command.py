"""What the training commands share: `--config` plus dotted overrides, resume flags, one-line errors, and
the closing summary of where the run's checkpoints and metrics are."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable


def train_main(argv: list[str] | None, *, prog: str, description: str, example: str, load: Callable,
               run: Callable) -> int:
    """`load(path, overrides) -> cfg` and `run(cfg) -> LoopResult`, imported lazily by the caller."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=f"example: {example}")
    parser.add_argument("--config", help="YAML recipe (default: the built-in defaults)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from the newest checkpoint in run_dir (the default when one exists)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from step 0 (refused when run_dir already holds checkpoints)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config changes the math; the changes are recorded in the run")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-6 train.steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every file it renames at INFO

    from cascade_jax.train.config import RunConfigError
    from cascade_jax.train.loop import TrainingDiverged

    overrides = list(args.overrides) + ([] if args.resume is None else [f"resume={str(args.resume).lower()}"])
    if args.allow_config_change:
        overrides.append("allow_config_change=true")
    try:
        cfg = load(args.config, overrides)
        result = run(cfg)
    except (RunConfigError, TrainingDiverged, ValueError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(summary(cfg.run_dir, result))
    return 0


def summary(run_dir: str, result) -> str:
    """What was reached and where everything is, for the last lines of the terminal."""
    from cascade_jax.train.loop import format_line

    headline = {
        "complete": f"done: trained to step {result.step}",
        "already_complete": f"{run_dir} is already complete (step {result.step}); nothing to do",
        "signal": f"stopped by {result.detail} at step {result.step} of {result.steps}; rerun the same command to resume",
        "end_of_data": f"the data ran out after step {result.step} of {result.steps}: the run ends there",
    }[result.reason]
    lines = [headline]
    if result.metrics:
        lines.append("final: " + format_line(result.step, result.steps, result.metrics))
    if not result.checkpoint_steps:
        lines.append(f"no checkpoint was written; nothing was saved in {run_dir}")
        return "\n".join(lines)
    kept = ", ".join(map(str, result.checkpoint_steps))
    lines.append(f"checkpoints: {os.path.join(run_dir, 'checkpoints')} (steps {kept}); "
                 f"load with cj.load_pretrained({run_dir!r}) or export with "
                 f"python -m tools.convert_hf to-hf --ckpt {run_dir} --out HF_DIR")
    lines.append(f"metrics: {os.path.join(run_dir, 'metrics.jsonl')}; TensorBoard: tensorboard --logdir "
                 f"{os.path.join(run_dir, 'tensorboard')}")
    return "\n".join(lines)

