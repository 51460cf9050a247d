import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.grouped_matmul import grouped_matmul, grouped_matmul_reference


@pytest.mark.parametrize("backend", ["xla", "ragged_dot", "tiled"])
@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1], [4, 4, 0, 1], [12, 0, 0, 0]])
def test_grouped_matmul_matches_reference(sizes, backend):
    rows = 12  # more rows than sum(sizes): the tail must come out as zeros
    k = jax.random.split(jax.random.key(sum(sizes)), 2)
    x = jax.random.normal(k[0], (rows, 6))
    w = jax.random.normal(k[1], (4, 6, 5))
    group_sizes = jnp.array(sizes, jnp.int32)
    out = grouped_matmul(x, w, group_sizes, backend)
    np.testing.assert_allclose(out, grouped_matmul_reference(x, w, group_sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)


def test_tokamax_backend_matches_xla():
    pytest.importorskip("tokamax")
    x = jax.random.normal(jax.random.key(0), (10, 8))
    w = jax.random.normal(jax.random.key(1), (3, 8, 4))
    sizes = jnp.array([4, 2, 4], jnp.int32)
    np.testing.assert_allclose(grouped_matmul(x, w, sizes, "tokamax"), grouped_matmul(x, w, sizes, "xla"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [1, 3, 4, 64])
def test_tiled_gradients_match_reference(tile):
    from cascade_jax.ops.grouped_matmul import _tiled

    x = jax.random.normal(jax.random.key(0), (21, 6))
    w = jax.random.normal(jax.random.key(1), (5, 6, 3))
    sizes = jnp.array([4, 0, 9, 1, 5], jnp.int32)
    probe = jax.random.normal(jax.random.key(2), (21, 3))
    tiled = jax.grad(lambda a, b: jnp.sum(_tiled(a, b, sizes, jnp.float32, tile) * probe), argnums=(0, 1))
    naive = jax.grad(lambda a, b: jnp.sum(grouped_matmul_reference(a, b, sizes) * probe), argnums=(0, 1))
    for g, g_ref in zip(tiled(x, w), naive(x, w)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
