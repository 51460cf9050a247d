"""Aux-loss-free MoE load balancing (Megatron `get_updated_expert_bias`), a pure function."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def updated_expert_bias(bias: Float[Array, "E"], load: Int[Array, "E"], rate: float) -> Float[Array, "E"]:
    """Raise the selection bias of under-loaded experts and lower it for over-loaded ones."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def load_imbalance(load: Int[Array, "L E"]) -> Float[Array, ""]:
    """Max over experts of load / mean load, averaged over MoE layers (1.0 = perfectly balanced)."""
    load = load.astype(jnp.float32)
    return jnp.mean(jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9))
