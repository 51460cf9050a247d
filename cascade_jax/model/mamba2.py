"""Mamba-2 mixer (block letter 'M'): in_proj → causal conv + SiLU → chunked SSD → gated grouped RMSNorm → out_proj."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.cache import MambaCache
from cascade_jax.model.context_parallel import sequence_conv, sequence_ssd
from cascade_jax.model.layers import Linear, kaiming_uniform_std, rms_normalize
from cascade_jax.ops.conv import causal_conv1d
from cascade_jax.ops.ssd import ssd_chunked, ssd_step


def _initial_dt_bias(config: ModelConfig, key) -> Array:
    """softplus⁻¹ of Δ drawn log-uniformly in [time_step_min, time_step_max], floored."""
    low, high = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = jnp.exp(jax.random.uniform(key, (config.mamba_num_heads,)) * (high - low) + low)
    dt = jnp.maximum(dt, config.time_step_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2Mixer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 ssd_backend: str = "xla"):
        c = config
        self.config, self.dtype, self.ssd_backend = c, dtype, ssd_backend
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

    def __call__(self, u: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
                 cache: MambaCache | None = None) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], MambaCache]:
        """Whole rows (training), or with `cache` the next tokens of each row: returns (out, new cache).
        The cache's state belongs to the document of the first token; padding (segment 0) carries none."""
        c = self.config
        batch, length, _ = u.shape
        heads, inner, groups, state = c.mamba_num_heads, c.mamba_d_inner, c.n_groups, c.ssm_state_size
        z, xbc, dt = jnp.split(self.in_proj(u), [inner, inner + c.mamba_conv_dim], axis=-1)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...].astype(self.dtype)
        conv_weight = self.conv_weight[...].astype(self.dtype)
        if cache is None:
            xbc = sequence_conv(xbc, conv_weight, conv_bias, segment_ids)
        else:
            if segment_ids is None:
                segment_ids = jnp.ones((batch, length), jnp.int32)
            xbc_in = xbc
            xbc, _ = causal_conv1d(xbc, conv_weight, conv_bias, segment_ids, state=cache.conv)
            conv_state = _conv_tail(cache.conv, xbc_in, segment_ids)
        xbc = jax.nn.silu(xbc)
        x, B, C = jnp.split(xbc, [inner, inner + groups * state], axis=-1)
        x = x.reshape(batch, length, heads, c.mamba_head_dim)
        B = B.reshape(batch, length, groups, state)
        C = C.reshape(batch, length, groups, state)

        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        if c.time_step_limit != (0.0, math.inf):
            dt = jnp.clip(dt, *c.time_step_limit)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        if cache is None:
            y = sequence_ssd(x, dt, A, B, C, c.chunk_size, segment_ids, self.ssd_backend)
        elif length == 1:   # decoding: one step of the recurrence instead of a padded chunk
            y, ssm_state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm)
            y = y[:, None]
        else:
            y, ssm_state = ssd_chunked(x, dt, A, B, C, c.chunk_size, segment_ids, initial_state=cache.ssm)
        y = y + self.D[...].astype(jnp.float32)[:, None] * x.astype(jnp.float32)

        # Gate first, then normalize each of the n_groups channel groups (norm_before_gate=False).
        gated = y.reshape(batch, length, inner) * jax.nn.silu(z.astype(jnp.float32))
        gated = rms_normalize(gated.reshape(batch, length, groups, inner // groups), c.layer_norm_epsilon)
        gated = gated.reshape(batch, length, inner) * self.norm_weight[...].astype(jnp.float32)
        out = self.out_proj(gated.astype(self.dtype))
        if cache is None:
            return out
        in_document = (segment_ids[:, -1] > 0)[:, None, None, None]
        return out, MambaCache(conv=conv_state, ssm=jnp.where(in_document, ssm_state, 0.0))


def _conv_tail(state, x, segment_ids):
    """The last K-1 conv inputs after this call, zeroed where they are not in the last token's document
    (a zero input adds nothing: the next call then sees exactly that document's history)."""
    width = state.shape[1]
    carried_segments = jnp.repeat(segment_ids[:, :1], width, axis=1)   # the state belongs to the first token
    inputs = jnp.concatenate([state.astype(x.dtype), x], axis=1)[:, -width:]
    segments = jnp.concatenate([carried_segments, segment_ids], axis=1)[:, -width:]
    keep = (segments == segment_ids[:, -1:]) & (segment_ids[:, -1:] > 0)
    return jnp.where(keep[..., None], inputs, 0).astype(state.dtype)
