"""Log-probs of sampled tokens under the training model, for packed rollouts (many responses per row).

The forward pass runs once over each [B, T] row; lm_head and the softmax run a chunk of tokens at a time
(`ops.cross_entropy.token_log_probs`), so no [tokens, vocab] array ever exists. With the sampler's
temperature / top-k / top-p the log-probs renormalise over the tokens the sampler could draw, so they
compare one to one with the sampler's `Completion.logprobs`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.ops.cross_entropy import token_log_probs


@dataclasses.dataclass(frozen=True)
class SamplingFilter:
    """The sampler's settings, as a hashable static argument; T = 1 with no truncation is the plain model."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

    def as_tuple(self) -> tuple | None:
        return None if self.is_identity else (self.temperature, self.top_k, self.top_p)


def sequence_log_probs(
    model,
    tokens: Int[Array, "B T"],
    targets: Int[Array, "B T"],
    segment_ids: Int[Array, "B T"],
    sampling: SamplingFilter = SamplingFilter(),
    chunk_size: int = 512,
) -> tuple[Float[Array, "B T"], object]:
    """(log p(targets[b, t] | the row's segment up to t) in fp32, the model output without logits)."""
    out = model(tokens, segment_ids=segment_ids, compute_logits=False)
    hidden = out.hidden_states.reshape(-1, out.hidden_states.shape[-1])
    logp = token_log_probs(hidden, model.output_kernel(), targets.reshape(-1), chunk_size, sampling.as_tuple())
    return logp.reshape(targets.shape), out


@partial(jax.jit, static_argnames=("graphdef", "sampling", "chunk_size"))
def micro_batched_log_probs(params, expert_bias, batch: dict, *, graphdef, sampling: SamplingFilter,
                            chunk_size: int = 512) -> Float[Array, "A B T"]:
    """`sequence_log_probs` of every micro-batch of an [A, B, T] batch, one micro-batch at a time (the
    memory of one training micro-batch, without gradients)."""
    model = nnx.merge(graphdef, params, expert_bias)

    def one(micro_batch):
        logp, _ = sequence_log_probs(model, micro_batch["tokens"], micro_batch["targets"],
                                     micro_batch["segment_ids"], sampling, chunk_size)
        return jnp.where(micro_batch["loss_mask"] > 0, logp, 0.0)

    return jax.lax.map(one, {k: batch[k] for k in ("tokens", "targets", "segment_ids", "loss_mask")})
