"""Token sampling: temperature, top-k and top-p as pure, jittable functions of per-row arrays.

Every setting is an array over rows, so one compiled step serves a batch whose requests differ in
temperature, k or p, and nothing here loops in Python per token. Ties are broken toward the lower
token id (a stable sort), so top-k keeps exactly k tokens and greedy agrees with jnp.argmax.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings, checked when built so a bad value fails at the API, not inside a jit."""

    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]; 1 = off
    top_k: int = 0                    # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1                        # samples per prompt

    def __post_init__(self):
        def fail(field, expected):
            raise ValueError(f"SamplingParams.{field}: expected {expected}, got {getattr(self, field)!r}")

        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            fail("max_new_tokens", "an int >= 1")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            fail("top_p", "a value in (0, 1]")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            fail("top_k", "an int >= 0 (0 = off)")
        if not (_is_int(self.n) and self.n >= 1):
            fail("n", "an int >= 1")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (tuple, list)) \
                or not all(_is_int(t) and t >= 0 for t in stops):
            fail("stop_token_ids", "a tuple or list of ints >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(stops))


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


def sample(
    key: Key[Array, "B"],
    logits: Float[Array, "B V"],
    temperature: Float[Array, "B"],
    top_k: Int[Array, "B"],
    top_p: Float[Array, "B"],
) -> tuple[Int[Array, "B"], Float[Array, "B"], Float[Array, "B"]]:
    """One token per row from `filtered_logits`, with one key per row so a request's draws do not depend
    on which other requests share its batch.

    Returns (tokens, log-prob under the sampled distribution, log-prob under the model at T = 1): the first
    is what an importance weight or a policy-gradient ratio needs, the second what a score reports."""
    log_probs = filtered_logits(logits, temperature, top_k, top_p)
    tokens = jax.vmap(jax.random.categorical)(key, log_probs).astype(jnp.int32)   # greedy: the one finite entry
    model = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def at_tokens(x):
        return jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]

    return tokens, at_tokens(log_probs), at_tokens(model)
