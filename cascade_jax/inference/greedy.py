"""Greedy generation by full re-computation over a fixed buffer (no cache).

Simple and exact, O(new tokens × full forward): meant for small evaluations (the SFT accuracy check),
not for serving. Prompts are left-padded with segment 0, which keeps them independent of the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.model.nemotron_h import NemotronH


@partial(jax.jit, static_argnames=("graphdef",))
def _next_tokens(state, tokens, segment_ids, position, *, graphdef):
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, segment_ids=segment_ids, compute_logits=False).hidden_states
    last = jax.lax.dynamic_index_in_dim(hidden, position, axis=1, keepdims=False)
    return jnp.argmax(model.logits(last).astype(jnp.float32), axis=-1).astype(jnp.int32)


def greedy_generate(model: NemotronH, prompts: Sequence[np.ndarray], max_new_tokens: int,
                    stop_ids: Sequence[int]) -> list[list[int]]:
    """The greedy continuation of each prompt, up to and including the first stop token."""
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = np.zeros((len(prompts), total), np.int32)
    segments = np.zeros((len(prompts), total), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):prompt_len] = prompt
        segments[row, prompt_len - len(prompt):] = 1
    graphdef, state = nnx.split(model)
    tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        chosen = _next_tokens(state, tokens, segments, prompt_len - 1 + step, graphdef=graphdef)
        tokens = tokens.at[:, prompt_len + step].set(chosen)
        done |= np.isin(np.asarray(chosen), list(stop_ids))
        if done.all():
            break
    outputs = []
    for row in np.asarray(tokens[:, prompt_len:]):
        stops = np.flatnonzero(np.isin(row, list(stop_ids)))
        outputs.append(row[: stops[0] + 1].tolist() if stops.size else row.tolist())
    return outputs
