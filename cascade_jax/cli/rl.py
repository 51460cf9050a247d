"""cascade-rl --config configs/rl/tiny.yaml [dotted.key=value ...]: one GRPO stage."""

from __future__ import annotations

import sys

from cascade_jax.cli.train_command import train_main


def main(argv: list[str] | None = None) -> int:
    from cascade_jax.rl.config import load_rl_config
    from cascade_jax.rl.grpo import run_grpo

    return train_main(argv, prog="cascade-rl",
                      description="One GRPO stage: rollouts from the slot engine, verifiable rewards, one update "
                                  "per rollout batch.",
                      example="cascade-rl --config configs/rl/tiny.yaml train.steps=10 rollout.temperature=0.8",
                      load=load_rl_config, run=run_grpo)


if __name__ == "__main__":
    sys.exit(main())
