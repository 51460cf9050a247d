"""Attention mixer (block letter '*'): GQA with no positional encoding and document-causal masking."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.cache import KVCache, write_rows
from cascade_jax.model.context_parallel import sequence_attention
from cascade_jax.model.layers import Linear
from cascade_jax.ops.attention import attention


class AttentionMixer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 backend: str = "auto"):
        c = config
        self.config, self.backend = c, backend
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        kw = dict(rngs=rngs, use_bias=c.attention_bias, std=c.initializer_range, dtype=dtype,
                  param_dtype=param_dtype)
        self.q_proj = Linear(c.hidden_size, q_dim, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(q_dim, c.hidden_size, ("q_heads", "embed"), **kw)

    def __call__(self, u: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
                 cache: KVCache | None = None, lengths: Int[Array, "B"] | None = None
                 ) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], KVCache]:
        """Whole rows (training), or with `cache` the next tokens of each row, written at `lengths[b]`
        onwards and attending to everything the row's cache holds of their document: (out, new cache)."""
        c = self.config
        batch, length, _ = u.shape
        q = self.q_proj(u).reshape(batch, length, c.num_attention_heads, c.head_dim)
        k = self.k_proj(u).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(u).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        if cache is None:
            out = sequence_attention(q, k, v, segment_ids, backend=self.backend)
            return self.o_proj(out.reshape(batch, length, -1))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        cache = KVCache(write_rows(cache.k, k, lengths), write_rows(cache.v, v, lengths),
                        write_rows(cache.segment_ids, segment_ids, lengths))
        # the XLA path takes per-row query offsets (decoding: one block of one query)
        out = attention(q, cache.k, cache.v, segment_ids, "xla", block_size=min(length, 512),
                        kv_segment_ids=cache.segment_ids, q_offset=lengths[:, None])
        return self.o_proj(out.reshape(batch, length, -1)), cache
