"""Grouped-query causal attention with document (segment) masking; no positional encoding.

Backends sit behind `attention(...)` so a fused kernel (cuDNN, tokamax) can replace the XLA one
without touching the model. Softmax runs in fp32 in every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_segment_ids: Int[Array, "B T"],
    kv_segment_ids: Int[Array, "B S"],
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
) -> Bool[Array, "B T S"]:
    """Key s is visible to query t iff both are in the same document and s is not after t."""
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return same_doc & (kv_positions[:, None, :] <= q_positions[:, :, None])


def _xla_attention(q, k, v, mask, scale):
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


_BACKENDS = {"xla": _xla_attention}


def attention(
    q: Float[Array, "B T H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    mask: Bool[Array, "B T S"],
    backend: str = "xla",
) -> Float[Array, "B T H P"]:
    """softmax(q kᵀ / √P + mask) v; query head h reads kv head h // (H / K)."""
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](q, k, v, mask, q.shape[-1] ** -0.5)


def attention_reference(q, k, v, mask):
    """Per-head loop with kv heads repeated explicitly (slow, obviously right)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    outputs = []
    for h in range(heads):
        kv = h // (heads // kv_heads)
        logits = jnp.einsum("btd,bsd->bts", q[:, :, h].astype(jnp.float32), k[:, :, kv].astype(jnp.float32))
        logits = logits / jnp.sqrt(q.shape[-1]) + jnp.where(mask, 0.0, -jnp.inf)
        outputs.append(jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits, axis=-1), v[:, :, kv].astype(jnp.float32)))
    return jnp.stack(outputs, axis=2).astype(q.dtype)
