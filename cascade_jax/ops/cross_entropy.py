"""Per-token log-probabilities and cross-entropy through lm_head, chunked over tokens.

Logits exist for one chunk of tokens at a time ([chunk, V] in fp32), in the forward pass and, because
each chunk is rematerialised, in the backward pass too: memory is O(chunk × V), never O(tokens × V).

With `sampling=(temperature, top_k, top_p)` the log-probs are those of the distribution a sampler with
those settings drew from (`cascade_jax.ops.sampling.filtered_logits`): what RL importance weights and
policy-gradient losses need for tokens sampled at top-p < 1. A token outside the kept set gets -inf.

Under a mesh the tokens arrive split over the token axes; each step of the loop then takes `chunk_size`
tokens from every shard at once (a shard-aligned [steps, shards, chunk] layout), so no device waits on
another's chunk and the loop never reshards, and lm_head is gathered once, in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from cascade_jax.ops.sampling import filtered_logits
from cascade_jax.parallel.rules import constrain, logical_to_spec


def _chunk_log_probs(hidden, kernel, targets, sampling):
    logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if sampling is not None and sampling[0] > 0 and sampling[1] <= 0 and sampling[2] >= 1:
        # Temperature only: the filter keeps every token, so skip its sort over the vocabulary.
        logits = logits / sampling[0]
    elif sampling is not None:
        rows = logits.shape[0]
        temperature, top_k, top_p = (jnp.broadcast_to(jnp.asarray(x), (rows,)) for x in sampling)
        log_probs = filtered_logits(logits, temperature, top_k, top_p)
        return jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def token_log_probs(
    hidden: Float[Array, "N D"],
    kernel: Float[Array, "D V"],
    targets: Int[Array, "N"],
    chunk_size: int = 512,
    sampling: tuple | None = None,
) -> Float[Array, "N"]:
    """log softmax(hidden @ kernel)[targets] in fp32, computed `chunk_size` tokens at a time; with
    `sampling=(temperature, top_k, top_p)` (scalars) under the sampler's filtered distribution instead."""
    num_tokens = hidden.shape[0]
    shards = _token_shards(num_tokens)
    local = num_tokens // shards
    chunk_size = min(chunk_size, local)
    pad = -local % chunk_size
    steps = (local + pad) // chunk_size
    kernel = constrain(kernel.astype(hidden.dtype), (None, "act_vocab"))
    body = jax.checkpoint(lambda h, t: _chunk_log_probs(h, kernel, t, sampling))

    def by_step(x):   # [N, ...] → [steps, shards, chunk, ...], each shard's tokens contiguous
        x = jnp.pad(x.reshape(shards, local, *x.shape[1:]), ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 1))
        x = jnp.swapaxes(x.reshape(shards, steps, chunk_size, *x.shape[2:]), 0, 1)
        return constrain(x, (None, "tokens") + (None,) * (x.ndim - 2))

    def step(carry, xs):
        h, t = xs
        return carry, body(h.reshape(-1, h.shape[-1]), t.reshape(-1)).reshape(t.shape)

    _, out = jax.lax.scan(step, None, (by_step(hidden), by_step(targets)))
    return jnp.swapaxes(out, 0, 1).reshape(shards, -1)[:, :local].reshape(-1)


def _token_shards(num_tokens: int) -> int:
    """How many ways the context mesh splits a flat token axis (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec(("tokens",), (num_tokens,), dict(mesh.shape))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


# tokamax's chunked loss pads the vocabulary to whole blocks with zero weight columns, whose logits (0) then
# count in the normaliser: it is exact only when its block divides the vocabulary.
TOKAMAX_VOCAB_BLOCK = 2048


def cross_entropy_sum(
    hidden: Float[Array, "N D"],
    kernel: Float[Array, "D V"],
    targets: Int[Array, "N"],
    mask: Array,
    chunk_size: int = 512,
    backend: str = "chunked",
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(Σ over masked tokens of −log p(target), number of masked tokens); divide once per global batch.

    `backend`: `chunked` (`token_log_probs`: chunks of tokens, any mesh) or `tokamax`
    (tokamax.linear_softmax_cross_entropy_loss's chunked version: blocks of tokens × vocabulary, one device)."""
    weights = mask.astype(jnp.float32)
    if backend == "chunked":
        nll = -token_log_probs(hidden, kernel, targets, chunk_size)
    elif backend == "tokamax":
        nll = _tokamax_nll(hidden, kernel, targets)
    else:
        raise ValueError(f"cross-entropy backend {backend!r}: expected 'chunked' or 'tokamax'")
    return jnp.sum(nll * weights), jnp.sum(weights)


def _tokamax_nll(hidden, kernel, targets):
    import tokamax  # imported lazily: only this backend needs it

    vocab = kernel.shape[1]
    if vocab % TOKAMAX_VOCAB_BLOCK:
        raise ValueError(f"cross-entropy backend 'tokamax' needs a vocabulary that is a multiple of "
                         f"{TOKAMAX_VOCAB_BLOCK} (got {vocab}): its padded vocabulary would enter the softmax")
    if not jax.sharding.get_abstract_mesh().empty:
        raise ValueError("cross-entropy backend 'tokamax' runs on one device; use 'chunked' under a mesh")
    return tokamax.linear_softmax_cross_entropy_loss(hidden, targets, kernel.astype(hidden.dtype),
                                                     reduction="none", implementation="chunked_xla")


def cross_entropy_reference(hidden, kernel, targets, mask):
    """Full [N, V] logits (slow, obviously right)."""
    logits = jnp.dot(hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
    weights = mask.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
