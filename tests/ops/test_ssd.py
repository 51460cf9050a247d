import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops import ssd
from cascade_jax.ops.ssd import ssd_chunked, ssd_reference


@pytest.fixture(params=["matrix", "scan"], autouse=True)
def state_passing(request, monkeypatch):
    """Every test runs with both ways of passing states between chunks."""
    monkeypatch.setattr(ssd, "_MAX_MATRIX_CHUNKS", 10**9 if request.param == "matrix" else 0)


def _inputs(key, batch, length, heads, head_dim, groups, state):
    k = jax.random.split(key, 6)
    x = jax.random.normal(k[0], (batch, length, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(k[1], (batch, length, heads)) - 1.0)
    A = -jnp.exp(jax.random.uniform(k[2], (heads,), minval=-1.0, maxval=2.5))
    B = jax.random.normal(k[3], (batch, length, groups, state))
    C = jax.random.normal(k[4], (batch, length, groups, state))
    s0 = jax.random.normal(k[5], (batch, heads, head_dim, state))
    return x, dt, A, B, C, s0


def _segments_from_lengths(rows):
    return jnp.array([sum(([i + 1] * n for i, n in enumerate(lengths)), []) for lengths in rows], jnp.int32)


def _assert_close(actual, expected, rtol):
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(actual - expected))) <= rtol * scale


@pytest.mark.parametrize(
    "length, chunk, heads, groups",
    [(16, 8, 2, 1), (45, 8, 4, 2), (37, 16, 4, 4), (100, 32, 2, 1), (5, 16, 2, 2)],
)
def test_chunked_matches_recurrence(length, chunk, heads, groups):
    x, dt, A, B, C, _ = _inputs(jax.random.key(length), 2, length, heads, 8, groups, 16)
    y, final = ssd_chunked(x, dt, A, B, C, chunk)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C)
    chex.assert_shape(y, (2, length, heads, 8))
    chex.assert_shape(final, (2, heads, 8, 16))
    chex.assert_type([y, final], jnp.float32)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(final, final_ref, 1e-5)


@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_many_short_documents_and_initial_state(chunk):
    lengths = [[1, 2, 7, 3, 9, 1, 1, 12, 5], [30, 11], [41]]
    seg = _segments_from_lengths(lengths)
    x, dt, A, B, C, s0 = _inputs(jax.random.key(1), 3, 41, 4, 8, 2, 16)
    y, final = ssd_chunked(x, dt, A, B, C, chunk, segment_ids=seg, initial_state=s0)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C, segment_ids=seg, initial_state=s0)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(final, final_ref, 1e-5)


def test_documents_do_not_interact():
    """A document's outputs are the same whatever precedes it in the row."""
    x, dt, A, B, C, _ = _inputs(jax.random.key(2), 1, 40, 2, 8, 1, 16)
    seg = _segments_from_lengths([[13, 27]])
    y, _ = ssd_chunked(x, dt, A, B, C, 8, segment_ids=seg)
    y_alone, _ = ssd_chunked(*(a[:, 13:] for a in (x, dt)), A, *(a[:, 13:] for a in (B, C)), 8)
    np.testing.assert_allclose(y[:, 13:], y_alone, rtol=1e-5, atol=1e-6)


def test_gradients_match_recurrence():
    x, dt, A, B, C, s0 = _inputs(jax.random.key(3), 1, 29, 2, 4, 1, 8)
    seg = _segments_from_lengths([[10, 19]])
    weights = jax.random.normal(jax.random.key(4), (1, 29, 2, 4))

    def loss(fn, *args):
        y, final = fn(*args)
        return jnp.sum(y * weights) + jnp.sum(final)

    chunked = jax.grad(lambda *a: loss(lambda *b: ssd_chunked(*b[:5], 8, seg, b[5]), *a), argnums=range(6))
    reference = jax.grad(lambda *a: loss(lambda *b: ssd_reference(*b[:5], seg, b[5]), *a), argnums=range(6))
    for g, g_ref in zip(chunked(x, dt, A, B, C, s0), reference(x, dt, A, B, C, s0)):
        assert bool(jnp.all(jnp.isfinite(g)))
        _assert_close(g, g_ref, 1e-5)


def test_long_decays_stay_accurate():
    """Large Δ·A over long chunks: differencing cumulative sums would lose fp32 precision here."""
    x, dt, A, B, C, _ = _inputs(jax.random.key(5), 1, 256, 2, 8, 1, 16)
    y, _ = ssd_chunked(x, dt * 20.0, A, B, C, 128)
    y_ref, _ = ssd_reference(x, dt * 20.0, A, B, C)
    _assert_close(y, y_ref, 1e-5)
