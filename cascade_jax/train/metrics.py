"""Training metrics: FLOP and MFU estimates (pure) and the writers (console, TensorBoard, JSONL)."""

from __future__ import annotations

import json
import os

import jax

from cascade_jax.config import ModelConfig

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6·N_active for the matmuls (input embedding excluded) plus causal attention scores and values.

    Attention: per layer, QKᵀ and PV cost 2·2·H·P·T/2 FLOPs per token forward (causal halves it), ×3 for
    forward + backward. The SSD scan's own FLOPs are small beside the projections and are left out.
    """
    attention_layers = config.layer_pattern.count("*")
    attention = 6.0 * attention_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * config.num_active_params() + attention


def peak_flops_per_device(override: float | None = None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


class MetricsWriter:
    """Appends every logged step to metrics.jsonl and to TensorBoard event files in the run directory."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self._tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
