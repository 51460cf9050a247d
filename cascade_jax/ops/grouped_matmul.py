"""Grouped matmul for dropless MoE: rows sorted by expert, each group multiplied by its own weight.

`grouped_matmul(x, w, group_sizes)` computes out[r] = x[r] @ w[g(r)], where rows 0..sizes[0]-1 belong
to group 0, the next sizes[1] rows to group 1, and so on. Rows past sum(group_sizes) give 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _xla(x, w, group_sizes, preferred_element_type):
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _tokamax(x, w, group_sizes, preferred_element_type):
    import tokamax  # imported lazily: only the GPU path needs it

    return tokamax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


_BACKENDS = {"xla": _xla, "tokamax": _tokamax}


def grouped_matmul(
    x: Float[Array, "R I"],
    w: Float[Array, "E I O"],
    group_sizes: Int[Array, "E"],
    backend: str = "xla",
) -> Float[Array, "R O"]:
    """Accumulates in fp32 and returns x's dtype."""
    if backend not in _BACKENDS:
        raise ValueError(f"grouped_matmul backend {backend!r}: expected one of {sorted(_BACKENDS)}")
    out = _BACKENDS[backend](x, w.astype(x.dtype), group_sizes.astype(jnp.int32), jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul_reference(x, w, group_sizes):
    """Loop over groups with a row mask (slow, obviously right)."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(x.shape[0])
    out = jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32)
    for e in range(w.shape[0]):
        in_group = (rows >= starts[e]) & (rows < ends[e])
        out = out + jnp.where(in_group[:, None], x.astype(jnp.float32) @ w[e].astype(jnp.float32), 0.0)
    return out.astype(x.dtype)
