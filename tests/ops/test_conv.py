import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.conv import causal_conv1d, causal_conv1d_reference


@pytest.mark.parametrize("length, width", [(1, 4), (3, 4), (17, 4), (9, 2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_matches_reference(length, width, with_state):
    k = jax.random.split(jax.random.key(length * 10 + width), 4)
    x = jax.random.normal(k[0], (2, length, 6))
    w = jax.random.normal(k[1], (width, 6))
    b = jax.random.normal(k[2], (6,))
    state = jax.random.normal(k[3], (2, width - 1, 6)) if with_state else None
    seg = jnp.array([[1] * length, [1] * (length // 2) + [2] * (length - length // 2)], jnp.int32)
    out, new_state = causal_conv1d(x, w, b, seg, state)
    ref, ref_state = causal_conv1d_reference(x, w, b, seg, state)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new_state, ref_state)


def test_conv_is_pytorch_conv1d_with_left_padding():
    """weight[K-1] multiplies the current token: cross-correlation with K-1 zeros on the left."""
    x = jax.random.normal(jax.random.key(0), (1, 10, 3))
    w = jax.random.normal(jax.random.key(1), (4, 3))
    out, _ = causal_conv1d(x, w)
    padded = np.pad(np.asarray(x[0]), ((3, 0), (0, 0)))
    expected = np.stack([(padded[t:t + 4] * np.asarray(w)).sum(0) for t in range(10)])
    np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-6)


def test_state_carries_across_calls():
    x = jax.random.normal(jax.random.key(2), (1, 11, 5))
    w = jax.random.normal(jax.random.key(3), (4, 5))
    whole, _ = causal_conv1d(x, w)
    first, state = causal_conv1d(x[:, :2], w)
    second, _ = causal_conv1d(x[:, 2:], w, state=state)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-6, atol=1e-6)
