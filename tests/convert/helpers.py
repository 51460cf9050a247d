"""Shared helpers for the converter tests."""

import numpy as np

from cascade_jax.weights.safetensors_dir import SafetensorsDir

FIXTURES = ("mamba_moe_attn", "grouped_routing", "dense_attn_mamba")


def read_all(directory) -> dict[str, tuple[str, tuple, bytes]]:
    """{name: (dtype, shape, raw bytes)} of every tensor in an HF directory."""
    with SafetensorsDir(directory) as checkpoint:
        return {n: (checkpoint.dtype(n), checkpoint.shape(n), checkpoint.get(n).tobytes())
                for n in checkpoint.names()}


def assert_logits_match(model, fixture_dir):
    ids = np.load(fixture_dir / "inputs.npy")
    expected = np.load(fixture_dir / "logits.npy")
    logits = np.asarray(model(ids).logits)
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
