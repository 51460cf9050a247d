"""MoE mixer (block letter 'E'): sigmoid router with a selection-only bias, group-limited top-k,
dropless sort-by-expert dispatch into relu² experts, plus an always-on shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.expert_parallel import expert_parallel
from cascade_jax.model.layers import ExpertBias, Linear, normal_param, relu_squared
from cascade_jax.model.mlp import MLP
from cascade_jax.ops.grouped_matmul import grouped_matmul
from cascade_jax.ops.permute import sort_rows, unsort_rows


def route(
    router_logits: Float[Array, "N E"],
    correction_bias: Float[Array, "E"],
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling_factor: float,
    normalize: bool,
) -> tuple[Float[Array, "N k"], Int[Array, "N k"]]:
    """Expert weights and indices per token (DeepSeek-V3 rule with sigmoid scores).

    The bias only steers which experts are chosen; weights come from the unbiased scores.
    """
    scores = jax.nn.sigmoid(router_logits.astype(jnp.float32))
    choice = scores + correction_bias.astype(jnp.float32)
    if n_group > 1:
        grouped = choice.reshape(choice.shape[0], n_group, -1)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                   # [N, n_group]
        _, kept_groups = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros_like(group_scores, bool).at[jnp.arange(choice.shape[0])[:, None], kept_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, grouped.shape[-1], axis=1), choice, -jnp.inf)
    _, indices = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * scaling_factor, indices


def dropless_experts(
    x: Float[Array, "N D"],
    weights: Float[Array, "N k"],
    indices: Int[Array, "N k"],
    up: Float[Array, "E D F"],
    down: Float[Array, "E F D"],
    backend: str = "auto",
) -> Float[Array, "N D"]:
    """Σ_j w_j · down_e(relu(up_e(x))²) with every (token, expert) pair computed (no capacity, no drops)."""
    num_tokens, top_k = indices.shape
    flat_experts = indices.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=up.shape[0])
    rows = sort_rows(x, order, top_k)                                         # [N·k, D], grouped by expert
    out = _expert_ffn(rows, group_sizes, up, down, backend)                   # [N·k, D]
    unsorted = unsort_rows(out, order)
    weighted = unsorted.reshape(num_tokens, top_k, -1).astype(jnp.float32) * weights[..., None]
    return weighted.sum(axis=1).astype(x.dtype)


def _expert_ffn(rows, group_sizes, up, down, backend):
    """relu² experts on rows already sorted by (local) expert; rows past Σ group_sizes give 0."""
    hidden = relu_squared(grouped_matmul(rows, up, group_sizes, backend))
    return grouped_matmul(hidden, down, group_sizes, backend)


def routed_experts(
    x: Float[Array, "N D"],
    weights: Float[Array, "N k"],
    indices: Int[Array, "N k"],
    up: Float[Array, "E D F"],
    down: Float[Array, "E F D"],
    backend: str = "auto",
    dispatch: str = "local",
    capacity_factor: float | None = None,
) -> tuple[Float[Array, "N D"], Int[Array, ""]]:
    """(routed-expert output, dropped assignments). `dispatch` picks how tokens reach experts: "local"
    (one program, `dropless_experts`) or an expert-parallel strategy of `cascade_jax.model.expert_parallel`
    run under the context mesh; the math is the same, only drops under a capacity factor differ."""
    if dispatch == "local":
        return dropless_experts(x, weights, indices, up, down, backend), jnp.zeros((), jnp.int32)
    ffn = lambda rows, sizes, u, d: _expert_ffn(rows, sizes, u, d, backend)  # noqa: E731
    out, dropped = expert_parallel(x, weights, indices, up, down, ffn, strategy=dispatch,
                                   capacity_factor=capacity_factor)
    return out.astype(x.dtype), dropped


def experts_reference(x, weights, indices, up, down):
    """Every expert on every token, masked by the routing (slow, obviously right)."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(up.shape[0]):
        y = relu_squared(x.astype(jnp.float32) @ up[e].astype(jnp.float32)) @ down[e].astype(jnp.float32)
        gate = jnp.sum(jnp.where(indices == e, weights, 0.0), axis=-1)
        out = out + gate[:, None] * y
    return out.astype(x.dtype)


class MoEMixer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 backend: str = "auto", dispatch: str = "local", capacity_factor: float | None = None):
        c = config
        self.config, self.dtype, self.backend = c, dtype, backend
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        e, d, f = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.router = Linear(d, e, ("embed", None), rngs=rngs, std=c.initializer_range,
                             dtype=jnp.float32, param_dtype=param_dtype)
        self.correction_bias = ExpertBias(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
        self.up_proj = normal_param(rngs, (e, d, f), c.initializer_range, param_dtype, ("experts", "embed", "expert_mlp"))
        self.down_proj = normal_param(rngs, (e, f, d), c.initializer_range, param_dtype, ("experts", "expert_mlp", "embed"))
        self.shared_experts = (MLP(c, c.moe_shared_expert_intermediate_size, rngs=rngs, axis="shared_mlp",
                                   dtype=dtype, param_dtype=param_dtype) if c.n_shared_experts else None)

    def __call__(self, u: Float[Array, "B T D"], token_mask: Bool[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T D"], Int[Array, "E"]]:
        """Returns the mixer output and tokens-per-expert (counting only `token_mask` tokens)."""
        out, load, _ = self.forward_with_stats(u, token_mask)
        return out, load

    def forward_with_stats(self, u: Float[Array, "B T D"], token_mask: Bool[Array, "B T"] | None = None
                           ) -> tuple[Float[Array, "B T D"], Int[Array, "E"], Int[Array, ""]]:
        """(output, tokens per expert, (token, expert) assignments dropped by a dispatch capacity)."""
        c = self.config
        tokens = u.reshape(-1, u.shape[-1])
        weights, indices = route(self.router(tokens), self.correction_bias[...], c.num_experts_per_tok,
                                 c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob)
        out, dropped = routed_experts(tokens.astype(self.dtype), weights, indices,
                                      self.up_proj[...].astype(self.dtype), self.down_proj[...].astype(self.dtype),
                                      self.backend, self.dispatch, self.capacity_factor)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        counted = jnp.ones(indices.shape[0], jnp.int32) if token_mask is None else token_mask.reshape(-1)
        load = jnp.zeros((c.n_routed_experts,), jnp.int32).at[indices].add(counted[:, None].astype(jnp.int32))
        return out.reshape(u.shape).astype(self.dtype), load, dropped
