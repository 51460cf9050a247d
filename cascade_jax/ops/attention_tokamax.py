"""Packed causal attention through tokamax's fused flash kernels (Pallas Mosaic-GPU on sm90, Pallas Triton).

tokamax's kernels take no segment ids, but they take, per query, the first key it may read (`k_start`)
and the query's own position (`q_indices`, from which causality gives the last key). Packed rows hold
each document as one contiguous run, so a query reads exactly the keys from its document's first token
up to itself: the document-causal mask of `attention_mask`, expressed as two integers per query. The
kernels skip whole key blocks below a query block's smallest `k_start`, and no [T, S] mask is built.

Contract: documents are contiguous runs of equal segment ids (what the packer writes), and query t's
token is key `q_offset + t` of the same row (self-attention, a context-parallel shard against the whole
row, or a cache that already holds the new tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# The public tokamax.dot_product_attention has no per-query key range; its implementations and Mask do.
from tokamax._src.ops.attention import api as tokamax_api
from tokamax._src.ops.attention import base as tokamax_base

# First choice first; the next is tried on NotImplementedError (wrong chip, unsupported shape or dtype).
GPU_IMPLEMENTATIONS = ("mosaic_gpu", "triton")


def document_start(segment_ids: Int[Array, "B S"]) -> Int[Array, "B S"]:
    """Index of the first token of each token's document (the latest change of segment id at or before it)."""
    positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = jnp.where((segment_ids != previous) | (positions == 0), positions, 0)
    return jax.lax.cummax(starts, axis=1)


def tokamax_attention(
    q: Float[Array, "B T H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    kv_segment_ids: Int[Array, "B S"],
    q_offset: int | Int[Array, "..."],
    scale: float,
    implementations: tuple[str, ...],
) -> Float[Array, "B T H P"]:
    """softmax(scale · q kᵀ + document-causal mask) v with one of tokamax's kernels (tried in order)."""
    batch, length = q.shape[:2]
    aligned = isinstance(q_offset, int) and q_offset == 0 and length == k.shape[1]
    q_indices = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32),
                                 (batch, length))
    k_start = jnp.take_along_axis(document_start(kv_segment_ids), jnp.minimum(q_indices, k.shape[1] - 1), axis=1)
    # Plain causality when queries are the keys (the kernels then skip blocks above the diagonal);
    # otherwise causality comes from each query's own position.
    mask = tokamax_base.Mask(k_start=k_start[:, None], is_causal=True)
    kwargs = {} if aligned else {"q_indices": q_indices[:, None]}
    errors = []
    for name in implementations:
        kernel = tokamax_api.IMPLEMENTATIONS.get(name)
        if kernel is None:
            errors.append(f"{name}: not in this tokamax")
            continue
        try:
            return kernel(q, k, v, mask=mask, logits_scale=scale,
                          precision=jax.lax.Precision.DEFAULT, **kwargs).astype(q.dtype)
        except NotImplementedError as error:
            errors.append(f"{name}: {error}")
    raise NotImplementedError("no tokamax attention kernel takes these inputs: " + "; ".join(errors))
