"""Dense MLP mixer (block letter '-'): down(relu(up(x))²), no gate."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from cascade_jax.config import ModelConfig
from cascade_jax.model.layers import Linear, relu_squared


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int, *, rngs: nnx.Rngs, axis: str = "mlp",
                 dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        kw = dict(rngs=rngs, use_bias=c.mlp_bias, std=c.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = Linear(c.hidden_size, intermediate_size, ("embed", axis), **kw)
        self.down_proj = Linear(intermediate_size, c.hidden_size, (axis, "embed"), **kw)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return self.down_proj(relu_squared(self.up_proj(x)))
