"""Attention mixer (block letter '*'): GQA with no positional encoding and document-causal masking."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.context_parallel import sequence_attention
from cascade_jax.model.layers import Linear


class AttentionMixer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 backend: str = "xla"):
        c = config
        self.config, self.backend = c, backend
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        kw = dict(rngs=rngs, use_bias=c.attention_bias, std=c.initializer_range, dtype=dtype,
                  param_dtype=param_dtype)
        self.q_proj = Linear(c.hidden_size, q_dim, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(q_dim, c.hidden_size, ("q_heads", "embed"), **kw)

    def __call__(self, u: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None
                 ) -> Float[Array, "B T D"]:
        c = self.config
        batch, length, _ = u.shape
        q = self.q_proj(u).reshape(batch, length, c.num_attention_heads, c.head_dim)
        k = self.k_proj(u).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(u).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        out = sequence_attention(q, k, v, segment_ids, backend=self.backend)
        return self.o_proj(out.reshape(batch, length, -1))
