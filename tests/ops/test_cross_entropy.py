import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.cross_entropy import TOKAMAX_VOCAB_BLOCK, cross_entropy_reference, cross_entropy_sum


@pytest.mark.parametrize("tokens, chunk", [(37, 8), (64, 64), (5, 16), (100, 33)])
def test_chunked_matches_naive_value_and_gradient(tokens, chunk):
    k = jax.random.split(jax.random.key(tokens), 4)
    hidden = jax.random.normal(k[0], (tokens, 24))
    kernel = 0.3 * jax.random.normal(k[1], (24, 300))
    targets = jax.random.randint(k[2], (tokens,), 0, 300)
    mask = jax.random.bernoulli(k[3], 0.7, (tokens,))

    def loss(fn, h, w):
        total, count = fn(h, w)
        return total / count

    chunked = lambda h, w: cross_entropy_sum(h, w, targets, mask, chunk)  # noqa: E731
    naive = lambda h, w: cross_entropy_reference(h, w, targets, mask)  # noqa: E731
    value, grads = jax.value_and_grad(lambda h, w: loss(chunked, h, w), argnums=(0, 1))(hidden, kernel)
    value_ref, grads_ref = jax.value_and_grad(lambda h, w: loss(naive, h, w), argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_loss_memory_stays_bounded_at_long_context():
    """T = 32,768 and V = 131,072 in bf16: the [T, V] fp32 logits alone would take 17 GB."""
    tokens, width, vocab = 32768, 256, 131072
    hidden = jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((width, vocab), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    mask = jax.ShapeDtypeStruct((tokens,), jnp.bool_)

    def loss(h, w, t, m):
        total, count = cross_entropy_sum(h, w, t, m)  # default chunk
        return total / count

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel, targets, mask).compile()
    memory = compiled.memory_analysis()
    peak = memory.temp_size_in_bytes + memory.output_size_in_bytes + memory.argument_size_in_bytes
    assert peak < 1 << 30, peak


@pytest.mark.parametrize("tokens", [37, 1100])   # 1100: more than one of tokamax's 1024-token blocks
def test_tokamax_backend_matches_naive_value_and_gradient(tokens):
    k = jax.random.split(jax.random.key(tokens), 4)
    hidden = jax.random.normal(k[0], (tokens, 24))
    kernel = 0.3 * jax.random.normal(k[1], (24, 2 * TOKAMAX_VOCAB_BLOCK))
    targets = jax.random.randint(k[2], (tokens,), 0, kernel.shape[1])
    mask = jax.random.bernoulli(k[3], 0.7, (tokens,))

    def loss(backend):
        return lambda h, w: cross_entropy_sum(h, w, targets, mask, backend=backend)[0]

    value, grads = jax.value_and_grad(loss("tokamax"), argnums=(0, 1))(hidden, kernel)
    value_ref, grads_ref = jax.value_and_grad(
        lambda h, w: cross_entropy_reference(h, w, targets, mask)[0], argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_tokamax_backend_refuses_a_vocabulary_it_would_pad():
    hidden, kernel = jnp.ones((4, 8)), jnp.ones((8, 300))
    with pytest.raises(ValueError, match="multiple of 2048 .got 300"):
        cross_entropy_sum(hidden, kernel, jnp.zeros(4, jnp.int32), jnp.ones(4), backend="tokamax")
    with pytest.raises(ValueError, match="backend 'fused'"):
        cross_entropy_sum(hidden, kernel, jnp.zeros(4, jnp.int32), jnp.ones(4), backend="fused")
