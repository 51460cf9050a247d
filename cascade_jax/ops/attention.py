"""Grouped-query causal attention with document (segment) masking; no positional encoding.

Backends sit behind `attention(...)` so a fused kernel can replace the XLA one without touching the
model: `xla` (blockwise), `flash` (pure-JAX flash), `tokamax` (tokamax's fused GPU kernels, Mosaic-GPU
then Triton; its chunked XLA version off GPU), `tokamax_mosaic` and `tokamax_triton` (one kernel, for
measuring), and `auto`: `tokamax` on GPU, `xla` elsewhere. Softmax runs in fp32 in every backend. No
backend builds a [T, T] mask: masks exist per block, or as per-query key ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from cascade_jax.ops import attention_tokamax
from cascade_jax.ops.flash_attention import flash_attention

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# Up to this many query blocks are unrolled, each reading only the keys up to its end (causal skipping);
# longer inputs loop over blocks with lax.map and read all keys (bounded memory, no skipping).
_MAX_UNROLLED_BLOCKS = 16


def attention_mask(
    q_segment_ids: Int[Array, "B T"],
    kv_segment_ids: Int[Array, "B S"],
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
) -> Bool[Array, "B T S"]:
    """Key s is visible to query t iff both are in the same document and s is not after t."""
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return same_doc & (kv_positions[:, None, :] <= q_positions[:, :, None])


def _dense(q, k, v, mask, scale):
    """One block of queries against its keys, batch and head axes first (plain batched matmuls)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                  # [B, K, S, P]
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(q.dtype)


def _xla_attention(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_size):
    length, kv_length = q.shape[1], k.shape[1]
    kv_index = jnp.broadcast_to(jnp.arange(kv_length), kv_segment_ids.shape)
    blocks = -(-length // block_size)
    if kv_segment_ids is segment_ids and blocks <= _MAX_UNROLLED_BLOCKS:   # self-attention: causal skipping
        outputs = []
        for start in range(0, length, block_size):
            end = min(length, start + block_size)
            mask = attention_mask(segment_ids[:, start:end], segment_ids[:, :end], kv_index[:, start:end],
                                  kv_index[:, :end])
            outputs.append(_dense(q[:, start:end], k[:, :end], v[:, :end], mask, scale))
        return jnp.concatenate(outputs, axis=1)
    index = jnp.broadcast_to(q_offset + jnp.arange(length), segment_ids.shape)
    pad = blocks * block_size - length
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(q.shape[0], blocks, block_size, *q.shape[2:])
    seg_blocks = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(-1, blocks, block_size)
    idx_blocks = jnp.pad(index, ((0, 0), (0, pad))).reshape(-1, blocks, block_size)

    # Checkpointed so the backward pass keeps one block's scores at a time, not every block's.
    @jax.checkpoint
    def one_block(args):
        q_b, seg_b, idx_b = args
        return _dense(q_b, k, v, attention_mask(seg_b, kv_segment_ids, idx_b, kv_index), scale)

    out = jax.lax.map(one_block, (q_blocks.swapaxes(0, 1), seg_blocks.swapaxes(0, 1), idx_blocks.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(q.shape[0], blocks * block_size, *q.shape[2:])[:, :length]


def _flash_attention(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_size):
    return flash_attention(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_size, block_size)


def _tokamax(implementations):
    def run(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_size):
        del segment_ids, block_size   # the kernels tile for themselves; queries' documents come from the keys'
        chosen = implementations if jax.default_backend() == "gpu" else ("xla_chunked",)
        return attention_tokamax.tokamax_attention(q, k, v, kv_segment_ids, q_offset, scale, chosen)
    return run


_BACKENDS = {"xla": _xla_attention, "flash": _flash_attention,
             "tokamax": _tokamax(attention_tokamax.GPU_IMPLEMENTATIONS),
             "tokamax_mosaic": _tokamax(("mosaic_gpu",)), "tokamax_triton": _tokamax(("triton",))}
BACKEND_NAMES = ("auto", *_BACKENDS)


def resolve_backend(name: str) -> str:
    """The backend `name` runs on this platform (`auto` → `tokamax` on GPU, `xla` elsewhere)."""
    if name == "auto":
        return "tokamax" if jax.default_backend() == "gpu" else "xla"
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {list(BACKEND_NAMES)}")
    return name


def attention(
    q: Float[Array, "B T H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    segment_ids: Int[Array, "B T"],
    backend: str = "xla",
    block_size: int = 512,
    *,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_offset: int | Int[Array, ""] = 0,
) -> Float[Array, "B T H P"]:
    """softmax(q kᵀ / √P + document-causal mask) v; query head h reads kv head h // (H / K).

    Keys sit at positions 0..S-1 and queries at q_offset + 0..T-1 of the same rows; by default the keys
    are the queries' own tokens (S = T, offset 0). Context parallelism passes a shard's queries with
    every shard's keys (`kv_segment_ids` for those, `q_offset` = where the shard starts). The tokamax
    backends also need each document to be one contiguous run (as packed rows are)."""
    backend = resolve_backend(backend)
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    return _BACKENDS[backend](q, k, v, segment_ids, kv_segment_ids, q_offset, q.shape[-1] ** -0.5, block_size)


def attention_reference(q, k, v, mask):
    """Per-head loop with kv heads repeated explicitly and an explicit [T, S] mask (slow, obviously right)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    outputs = []
    for h in range(heads):
        kv = h // (heads // kv_heads)
        logits = jnp.einsum("btd,bsd->bts", q[:, :, h].astype(jnp.float32), k[:, :, kv].astype(jnp.float32))
        logits = logits / jnp.sqrt(q.shape[-1]) + jnp.where(mask, 0.0, -jnp.inf)
        outputs.append(jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits, axis=-1), v[:, :, kv].astype(jnp.float32)))
    return jnp.stack(outputs, axis=2).astype(q.dtype)
