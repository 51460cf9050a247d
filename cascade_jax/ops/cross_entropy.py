"""Per-token log-probabilities and cross-entropy through lm_head, chunked over tokens.

Logits exist for one chunk of tokens at a time ([chunk, V] in fp32), in the forward pass and, because
each chunk is rematerialised, in the backward pass too: memory is O(chunk × V), never O(tokens × V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _chunk_log_probs(hidden, kernel, targets):
    logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def token_log_probs(
    hidden: Float[Array, "N D"],
    kernel: Float[Array, "D V"],
    targets: Int[Array, "N"],
    chunk_size: int = 512,
) -> Float[Array, "N"]:
    """log softmax(hidden @ kernel)[targets] in fp32, computed `chunk_size` tokens at a time."""
    num_tokens = hidden.shape[0]
    chunk_size = min(chunk_size, num_tokens)
    pad = -num_tokens % chunk_size
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
    chunks = (num_tokens + pad) // chunk_size
    body = jax.checkpoint(lambda h, t: _chunk_log_probs(h, kernel, t))
    _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None,
                          (hidden.reshape(chunks, chunk_size, -1), targets.reshape(chunks, chunk_size)))
    return out.reshape(-1)[:num_tokens]


def cross_entropy_sum(
    hidden: Float[Array, "N D"],
    kernel: Float[Array, "D V"],
    targets: Int[Array, "N"],
    mask: Array,
    chunk_size: int = 512,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(Σ over masked tokens of −log p(target), number of masked tokens); divide once per global batch."""
    weights = mask.astype(jnp.float32)
    nll = -token_log_probs(hidden, kernel, targets, chunk_size)
    return jnp.sum(nll * weights), jnp.sum(weights)


def cross_entropy_reference(hidden, kernel, targets, mask):
    """Full [N, V] logits (slow, obviously right)."""
    logits = jnp.dot(hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
    weights = mask.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
