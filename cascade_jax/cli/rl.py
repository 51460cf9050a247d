"""cascade-rl --config RECIPE [--stage NAME] [dotted.key=value ...]

A recipe with `stages:` (configs/cascade/*.yaml) runs the whole cascade, or one stage with --stage; any other
YAML is one GRPO/MOPD stage (configs/rl/*.yaml)."""

from __future__ import annotations

import argparse
import logging
import sys

from cascade_jax.cli.train_command import train_main

EXAMPLE = "cascade-rl --config configs/cascade/tiny.yaml   |   cascade-rl --config configs/rl/tiny.yaml train.steps=10"


def main(argv: list[str] | None = None) -> int:
    from cascade_jax.rl.cascade_config import is_cascade_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    known, _ = probe.parse_known_args(argv)
    if is_cascade_recipe(known.config):
        return cascade_main(argv)
    if "--stage" in argv or any(a.startswith("--stage=") for a in argv):
        print(f"cascade-rl: error: --stage needs a cascade recipe (a YAML with stages:); {known.config} is one "
              f"stage", file=sys.stderr)
        return 1

    from cascade_jax.rl.config import load_rl_config
    from cascade_jax.rl.grpo import run_grpo

    return train_main(argv, prog="cascade-rl",
                      description="One GRPO/MOPD stage (a configs/rl recipe), or a whole cascade "
                                  "(a configs/cascade recipe).",
                      example=EXAMPLE, load=load_rl_config, run=run_grpo)


def cascade_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cascade-rl", description="Run a cascade recipe: SFT (optional), then "
                                     "its GRPO/MOPD stages in order, evaluations, report and HF export.",
                                     epilog=f"example: {EXAMPLE}")
    parser.add_argument("--config", required=True, help="cascade recipe (configs/cascade/*.yaml)")
    parser.add_argument("--stage", help="run only this stage (its start must have run)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit_per_domain=8")
    args = parser.parse_intermixed_args(argv)   # overrides before and after --stage
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import absl.logging  # Orbax warns per parameter when a stage exports or loads; keep the terminal to the stages

    absl.logging.set_verbosity(absl.logging.ERROR)

    from cascade_jax.rl.cascade import Cascade
    from cascade_jax.rl.cascade_config import load_cascade_config
    from cascade_jax.train.config import RunConfigError
    from cascade_jax.train.loop import TrainingDiverged

    try:
        cascade = Cascade(load_cascade_config(args.config, args.overrides))
        result = cascade.run(args.stage)
    except (RunConfigError, TrainingDiverged, ValueError, OSError) as e:
        print(f"cascade-rl: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(f"cascade-rl: {result.detail}")
    timings = cascade.timings()
    if timings:
        split = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items())
        print(f"wall time {sum(timings.values()) / 60:.1f} min: {split}")
    if result.report:
        print(f"report: {result.report}")
    if result.export:
        print(f"HF export of the final checkpoint: {result.export} (transformers: "
              f"AutoModelForCausalLM.from_pretrained({result.export!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
