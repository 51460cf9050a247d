"""HybridCache: what decoding carries from one call of the model to the next.

Per Mamba layer the last K-1 conv inputs and the SSM state (always fp32: a bf16 state drifts from what the
chunked scan computes, and the sampler's log-probs with it); per attention layer preallocated keys and
values with their segment ids (0 = empty or padding, never attended); nothing for MoE and MLP layers.
`lengths[b]` is how many tokens row b holds: the next call writes its tokens there. There is no
positional encoding in NemotronH, so a token's cache index is all its position means.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.parallel.rules import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MambaCache:
    conv: Float[Array, "B K1 C"]       # the last K-1 conv inputs of the row's current document (zeros: none)
    ssm: Float[Array, "B H P N"]       # fp32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Float[Array, "B S K P"]
    v: Float[Array, "B S K P"]
    segment_ids: Int[Array, "B S"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridCache:
    layers: tuple[MambaCache | KVCache | None, ...]
    lengths: Int[Array, "B"]

    @property
    def dtype(self):
        """The dtype of keys, values and conv inputs (the SSM state is always fp32)."""
        layer = next(c for c in self.layers if c is not None)
        return layer.conv.dtype if isinstance(layer, MambaCache) else layer.k.dtype

    @property
    def max_len(self) -> int:
        return next((c.k.shape[1] for c in self.layers if isinstance(c, KVCache)), 0)

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> HybridCache:
        """An empty cache for `batch` rows of up to `max_len` tokens; K/V and conv inputs in `dtype`."""
        c = config
        layers = []
        for letter in c.layer_pattern:
            if letter == "M":
                layers.append(MambaCache(
                    conv=jnp.zeros((batch, c.conv_kernel - 1, c.mamba_conv_dim), dtype),
                    ssm=jnp.zeros((batch, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size), jnp.float32)))
            elif letter == "*":
                shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
                layers.append(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                      jnp.zeros((batch, max_len), jnp.int32)))
            else:
                layers.append(None)
        return cls(tuple(layers), jnp.zeros((batch,), jnp.int32))

    def constrained(self) -> HybridCache:
        """Pinned to the rules table under a mesh: rows over the batch axes, heads over `tensor` (a no-op
        without a mesh). Called on the cache a jitted step returns, so it stays sharded across steps."""
        def pin(layer):
            if isinstance(layer, MambaCache):
                return MambaCache(constrain(layer.conv, ("batch", None, "mamba_conv")),
                                  constrain(layer.ssm, ("batch", "mamba_heads", None, None)))
            if isinstance(layer, KVCache):
                kv = ("batch", None, "kv_heads", None)
                return KVCache(constrain(layer.k, kv), constrain(layer.v, kv),
                               constrain(layer.segment_ids, ("batch", None)))
            return layer

        return HybridCache(tuple(pin(layer) for layer in self.layers), constrain(self.lengths, ("batch",)))

    def rows(self, index: Int[Array, "R"]) -> HybridCache:
        """The cache of rows `index` (e.g. one prefilled prompt copied into n rows)."""
        return jax.tree.map(lambda a: a[index], self)

    def with_rows(self, index: Int[Array, "R"], rows: HybridCache) -> HybridCache:
        """This cache with rows `index` replaced by `rows`; indices past the batch are dropped."""
        return jax.tree.map(lambda a, r: a.at[index].set(r, mode="drop"), self, rows)


def write_rows(buffer: Array, new: Array, start: Int[Array, "B"]) -> Array:
    """buffer[b, start[b] : start[b] + T] = new[b] for every row (the caller keeps it inside the buffer)."""
    return jax.vmap(lambda buf, n, s: jax.lax.dynamic_update_slice_in_dim(buf, n.astype(buf.dtype), s, axis=0))(
        buffer, new, start)
