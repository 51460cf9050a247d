"""Causal depthwise 1-D convolution with document resets and a carried state (the Mamba-2 conv).

out[t, c] = bias[c] + Σ_k weight[k, c] · x[t - (K-1) + k, c], where taps before the document start
(or before the row start, absent a carried state) read 0. weight[K-1] multiplies the current token,
as PyTorch's Conv1d(padding=K-1) truncated to the first T outputs.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _with_history(x, width, segment_ids, state, state_segment_ids):
    """Prepend the K-1 carried inputs (zeros when none). They belong to the row's first document unless
    `state_segment_ids` says otherwise (context parallelism: the left neighbour's last tokens).

    Returns (inputs with history, their segment ids, the segment ids of the tokens themselves)."""
    batch, length, channels = x.shape
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    if state is None:
        state = jnp.zeros((batch, width - 1, channels), x.dtype)
    if state_segment_ids is None:
        state_segment_ids = jnp.repeat(segment_ids[:, :1], width - 1, axis=1)
    x_full = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    seg_full = jnp.concatenate([state_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)
    return x_full, seg_full, segment_ids


def causal_conv1d(
    x: Float[Array, "B T C"],
    weight: Float[Array, "K C"],
    bias: Float[Array, "C"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    state: Float[Array, "B K-1 C"] | None = None,
    state_segment_ids: Int[Array, "B K-1"] | None = None,
) -> tuple[Float[Array, "B T C"], Float[Array, "B K-1 C"]]:
    """Returns the conv output (no activation) and the last K-1 inputs, the state for the next call."""
    batch, length, channels = x.shape
    width = weight.shape[0]
    x_full, seg_full, segment_ids = _with_history(x, width, segment_ids, state, state_segment_ids)
    out = jnp.zeros((batch, length, channels), jnp.promote_types(x.dtype, weight.dtype))
    for k in range(width):
        tap = x_full[:, k:k + length]
        same_doc = seg_full[:, k:k + length] == segment_ids
        out = out + jnp.where(same_doc[..., None], tap, 0) * weight[k]
    if bias is not None:
        out = out + bias
    return out.astype(x.dtype), x_full[:, length:]


def causal_conv1d_reference(x, weight, bias=None, segment_ids=None, state=None, state_segment_ids=None):
    """Token-by-token loop over explicit windows (slow, obviously right)."""
    length, width = x.shape[1], weight.shape[0]
    x_full, seg_full, segment_ids = _with_history(x, width, segment_ids, state, state_segment_ids)
    outputs = []
    for t in range(length):
        window = x_full[:, t:t + width]                              # [B, K, C]; row K-1 is token t
        in_doc = seg_full[:, t:t + width] == segment_ids[:, t:t + 1]
        value = jnp.sum(window * in_doc[..., None] * weight, axis=1)
        outputs.append(value if bias is None else value + bias)
    return jnp.stack(outputs, axis=1).astype(x.dtype), x_full[:, length:]
