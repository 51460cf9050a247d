"""Token sampling: temperature, top-k and top-p as pure, jittable functions of per-row arrays.

The filter itself (`filtered_logits`) lives in `cascade_jax.ops.sampling`, so the trainer's log-probs of
sampled tokens renormalise exactly as the sampler did. Nothing here loops in Python per token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key

from cascade_jax.ops.sampling import filtered_logits


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
