"""The Mamba-2 mixer gives the same values and gradients with the Pallas SSD kernels as with XLA's scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.mamba2 import Mamba2Mixer
from cascade_jax.model.nemotron_h import Backends


def _loss_and_grads(backend):
    config = ModelConfig.preset("tiny")
    mixer = Mamba2Mixer(config, rngs=nnx.Rngs(0), ssd_backend=backend)
    graphdef, params = nnx.split(mixer)
    u = jax.random.normal(jax.random.key(1), (2, 80, config.hidden_size))
    segments = jnp.array([[1] * 80, [1] * 21 + [2] * 43 + [3] * 10 + [0] * 6], jnp.int32)   # 64: a chunk edge

    def loss(params, u):
        out = nnx.merge(graphdef, params)(u, segments)
        return jnp.sum(out * jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape))

    return jax.value_and_grad(loss, argnums=(0, 1))(params, u)


def test_pallas_mixer_matches_xla_values_and_gradients():
    (value, grads), (value_ref, grads_ref) = _loss_and_grads("pallas"), _loss_and_grads("xla")
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unknown_ssd_backend_is_refused():
    with pytest.raises(ValueError, match="ssd 'triton'"):
        Backends(ssd="triton")
