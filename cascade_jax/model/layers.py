"""Building blocks shared by the mixers: linear maps and RMSNorm with logical axis names.

Every parameter carries `logical_axes` metadata; `cascade_jax.parallel` maps those names to mesh axes.
Parameters live in `param_dtype` and are cast to the compute `dtype` at use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float


class ExpertBias(nnx.Variable):
    """Selection-only router bias: not trained by gradients, updated by load balancing."""


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype, axes) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of a PyTorch Linear weight)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs, use_bias: bool = False,
                 std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = normal_param(rngs, (d_in, d_out), std, param_dtype, axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
        # A 2-D matmul: with [B, T, I] inputs the weight gradient contracts two axes, which XLA's CPU
        # backend lowers to a transpose plus a slow generic dot (about 4× slower forward+backward).
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(flat, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rms_normalize(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """w ⊙ x / sqrt(mean(x²) + eps), in fp32, cast back to the input dtype (plain gain, not 1 + w)."""

    def __init__(self, size: int, eps: float, *, param_dtype=jnp.float32, axes=("norm",)):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return (self.weight[...].astype(jnp.float32) * rms_normalize(x, self.eps)).astype(x.dtype)


def relu_squared(x: Array) -> Array:
    return jnp.square(jax.nn.relu(x))


def kaiming_uniform_std(fan_in: int) -> float:
    """Std of PyTorch's default Linear init, U(±1/√fan_in), for a normal draw of equal variance."""
    return 1.0 / math.sqrt(3.0 * fan_in)
