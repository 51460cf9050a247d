"""cascade-sft --config configs/sft/tiny.yaml [dotted.key=value ...]"""

from __future__ import annotations

import sys

from cascade_jax.cli.train_command import summary, train_main

__all__ = ["main", "summary"]


def main(argv: list[str] | None = None) -> int:
    from cascade_jax.train.config import load_sft_config
    from cascade_jax.train.sft import run_sft

    return train_main(argv, prog="cascade-sft", description="Supervised fine-tuning of NemotronH on packed chat data.",
                      example="cascade-sft --config configs/sft/tiny.yaml train.steps=20 optimizer.lr=1e-3",
                      load=load_sft_config, run=run_sft)


if __name__ == "__main__":
    sys.exit(main())
