"""Mamba-2 mixer (block letter 'M'): in_proj → causal conv + SiLU → chunked SSD → gated grouped RMSNorm → out_proj."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.context_parallel import sequence_conv, sequence_ssd
from cascade_jax.model.layers import Linear, kaiming_uniform_std, rms_normalize


def _initial_dt_bias(config: ModelConfig, key) -> Array:
    """softplus⁻¹ of Δ drawn log-uniformly in [time_step_min, time_step_max], floored."""
    low, high = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = jnp.exp(jax.random.uniform(key, (config.mamba_num_heads,)) * (high - low) + low)
    dt = jnp.maximum(dt, config.time_step_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2Mixer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        c = config
        self.config, self.dtype = c, dtype
        heads, inner, conv_dim = c.mamba_num_heads, c.mamba_d_inner, c.mamba_conv_dim
        self.in_proj = Linear(c.hidden_size, c.mamba_in_proj_dim, ("embed", "mamba_in_proj"), rngs=rngs,
                              use_bias=c.mamba_proj_bias, std=c.initializer_range,
                              dtype=dtype, param_dtype=param_dtype)
        conv_std = kaiming_uniform_std(c.conv_kernel)
        # conv weight is [K, channels]: row K-1 multiplies the current token.
        self.conv_weight = nnx.Param(conv_std * jax.random.normal(rngs.params(), (c.conv_kernel, conv_dim),
                                                                  param_dtype), logical_axes=(None, "mamba_conv"))
        self.conv_bias = (nnx.Param(jnp.zeros((conv_dim,), param_dtype), logical_axes=("mamba_conv",))
                          if c.use_conv_bias else None)
        self.dt_bias = nnx.Param(_initial_dt_bias(c, rngs.params()).astype(param_dtype),
                                 logical_axes=("mamba_heads",))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, heads + 1, dtype=jnp.float32)), logical_axes=("mamba_heads",))
        self.D = nnx.Param(jnp.ones((heads,), jnp.float32), logical_axes=("mamba_heads",))
        self.norm_weight = nnx.Param(jnp.ones((inner,), param_dtype), logical_axes=("mamba_inner",))
        out_std = kaiming_uniform_std(inner) / math.sqrt(c.num_layers) if c.rescale_prenorm_residual \
            else c.initializer_range
        self.out_proj = Linear(inner, c.hidden_size, ("mamba_inner", "embed"), rngs=rngs,
                               use_bias=c.mamba_proj_bias, std=out_std, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, u: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None
                 ) -> Float[Array, "B T D"]:
        c = self.config
        batch, length, _ = u.shape
        heads, inner, groups, state = c.mamba_num_heads, c.mamba_d_inner, c.n_groups, c.ssm_state_size
        z, xbc, dt = jnp.split(self.in_proj(u), [inner, inner + c.mamba_conv_dim], axis=-1)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...].astype(self.dtype)
        xbc = sequence_conv(xbc, self.conv_weight[...].astype(self.dtype), conv_bias, segment_ids)
        xbc = jax.nn.silu(xbc)
        x, B, C = jnp.split(xbc, [inner, inner + groups * state], axis=-1)
        x = x.reshape(batch, length, heads, c.mamba_head_dim)
        B = B.reshape(batch, length, groups, state)
        C = C.reshape(batch, length, groups, state)

        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        if c.time_step_limit != (0.0, math.inf):
            dt = jnp.clip(dt, *c.time_step_limit)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y = sequence_ssd(x, dt, A, B, C, c.chunk_size, segment_ids)
        y = y + self.D[...].astype(jnp.float32)[:, None] * x.astype(jnp.float32)

        # Gate first, then normalize each of the n_groups channel groups (norm_before_gate=False).
        gated = y.reshape(batch, length, inner) * jax.nn.silu(z.astype(jnp.float32))
        gated = rms_normalize(gated.reshape(batch, length, groups, inner // groups), c.layer_norm_epsilon)
        gated = gated.reshape(batch, length, inner) * self.norm_weight[...].astype(jnp.float32)
        return self.out_proj(gated.astype(self.dtype))
