import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.grouped_matmul import grouped_matmul, grouped_matmul_reference


@pytest.mark.parametrize("backend", ["xla", "ragged_dot", "tiled", "tokamax", "auto"])
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


@pytest.mark.parametrize("backend", ["tokamax", "auto"])
def test_tokamax_and_auto_gradients_match_reference(backend):
    """Off GPU tokamax.ragged_dot is its XLA fallback; on GPU (benchmarks/gpu/run.sh) its Mosaic kernels."""
    x = jax.random.normal(jax.random.key(0), (21, 8))
    w = jax.random.normal(jax.random.key(1), (5, 8, 4))
    sizes = jnp.array([4, 0, 9, 1, 5], jnp.int32)
    probe = jax.random.normal(jax.random.key(2), (21, 4))
    got = jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, sizes, backend) * probe), argnums=(0, 1))(x, w)
    want = jax.grad(lambda a, b: jnp.sum(grouped_matmul_reference(a, b, sizes) * probe), argnums=(0, 1))(x, w)
    for g, g_ref in zip(got, want):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_tokamax_bf16_accumulates_in_fp32():
    x = jax.random.normal(jax.random.key(3), (64, 256), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (4, 256, 8), jnp.bfloat16)
    sizes = jnp.array([10, 30, 0, 24], jnp.int32)
    got = grouped_matmul(x, w, sizes, "tokamax")
    assert got.dtype == jnp.bfloat16
    want = grouped_matmul_reference(x, w, sizes)   # fp32 products, one rounding at the end
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-2, atol=1e-1)


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


def test_register_backend_adds_a_selectable_backend_and_refuses_to_overwrite():
    from cascade_jax.ops import grouped_matmul as ops

    calls = []

    def doubled(x, w, group_sizes, preferred_element_type):
        calls.append(preferred_element_type)
        return 2 * ops._tiled(x, w, group_sizes, preferred_element_type)

    name = "test_doubled"
    assert name not in ops.backend_names()
    ops.register_backend(name, doubled)
    try:
        assert name in ops.backend_names() and list(ops.backend_names()) == sorted(ops.backend_names())
        ops.register_backend(name, doubled)   # the same function again: a no-op
        x = jax.random.normal(jax.random.key(0), (7, 4))
        w = jax.random.normal(jax.random.key(1), (3, 4, 2))
        sizes = jnp.array([2, 0, 5], jnp.int32)
        np.testing.assert_allclose(grouped_matmul(x, w, sizes, name), 2 * grouped_matmul_reference(x, w, sizes),
                                   rtol=1e-5, atol=1e-5)
        assert calls == [jnp.float32]          # accumulation type passed through
        with pytest.raises(ValueError, match="already registered"):
            ops.register_backend(name, lambda *a: None)
        with pytest.raises(ValueError, match="already registered"):
            ops.register_backend("xla", doubled)   # built-ins are protected too
        with pytest.raises(ValueError, match="callable"):
            ops.register_backend("test_not_callable", 3)
    finally:
        ops._BACKENDS.pop(name, None)


def test_unknown_backend_lists_the_registered_ones():
    x, w, sizes = jnp.ones((2, 3)), jnp.ones((1, 3, 2)), jnp.array([2], jnp.int32)
    with pytest.raises(ValueError, match=r"'nope': expected one of \[.*'tiled'.*\]"):
        grouped_matmul(x, w, sizes, "nope")
