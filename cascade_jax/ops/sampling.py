"""The distribution a sampler draws from: logits / temperature, then top-k, then top-p, renormalised.

Every setting is an array over rows, so one compiled step serves a batch whose requests differ in
temperature, k or p. Ties are broken toward the lower token id (a stable sort), so top-k keeps exactly
k tokens and greedy agrees with jnp.argmax. The sampler draws from it and the RL trainer scores sampled
tokens under it, so both see one definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def filtered_logits(
    logits: Float[Array, "B V"],
    temperature: Float[Array, "B"],
    top_k: Int[Array, "B"],
    top_p: Float[Array, "B"],
) -> Float[Array, "B V"]:
    """Log-probabilities (fp32, normalised) of the distribution actually sampled from; removed tokens are -inf.

    logits / T, then the k most likely, then the smallest most-likely set whose mass reaches p (the mass
    before a token must be < p; the top token always stays). T = 0 rows are a one-hot at the argmax."""
    logits = logits.astype(jnp.float32)
    batch, vocab = logits.shape
    greedy = temperature <= 0
    # Greedy is top-1 at T = 1: the same sort picks the token, and no division by zero happens.
    scaled = logits / jnp.where(greedy, 1.0, temperature).astype(jnp.float32)[:, None]
    k = jnp.where(greedy, 1, top_k)[:, None]
    p = jnp.where(greedy, 1.0, top_p).astype(jnp.float32)[:, None]

    order = jnp.argsort(-scaled, axis=-1, stable=True)              # most likely first; ties: lower id
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)
    keep = (k <= 0) | (rank < k)
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # p = 1 is "off" exactly: an fp32 cumulative sum can reach 1 before the tail ends.
    keep &= (p >= 1) | (mass_before < p) | (rank == 0)

    ranks = jnp.zeros_like(order).at[jnp.arange(batch)[:, None], order].set(rank)   # inverse permutation
    kept = jnp.take_along_axis(keep, ranks, axis=-1)
    return jax.nn.log_softmax(jnp.where(kept, scaled, -jnp.inf), axis=-1)
