"""tokamax attention (per-query key ranges instead of segment ids) against the explicit-mask reference.

Off GPU the backend runs tokamax's chunked XLA implementation, so these tests pin the translation from
segment ids and query offsets to tokamax's mask; the fused GPU kernels get the same translation and are
checked against the XLA path by benchmarks/gpu/run.sh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.attention import attention, attention_mask, attention_reference, resolve_backend
from cascade_jax.ops.attention_tokamax import document_start, tokamax_attention

LENGTH = 40


def _qkv(heads, kv_heads, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (2, LENGTH, h, 16), dtype) for key, h in zip(k, (heads, kv_heads, kv_heads)))


def _segments():
    """Row 0: one document; row 1: documents of 7, 20 and 10 tokens, then 3 padding tokens (segment 0)."""
    return jnp.array([[1] * LENGTH, [1] * 7 + [2] * 20 + [3] * 10 + [0] * 3], jnp.int32)


def _reference(q, k, v, segments, offset=0):
    kv_index = jnp.broadcast_to(jnp.arange(k.shape[1]), segments.shape)
    q_index = kv_index[:, offset:offset + q.shape[1]]
    mask = attention_mask(segments[:, offset:offset + q.shape[1]], segments, q_index, kv_index)
    return attention_reference(q, k, v, mask)


def test_document_start_is_the_first_token_of_each_run():
    segments = jnp.array([[1, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(document_start(segments), [[0, 0, 2, 2, 2, 5, 5], [0] * 7])


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (2, 1)])
def test_values_and_gradients_match_reference(heads, kv_heads):
    q, k, v = _qkv(heads, kv_heads)
    segments = _segments()
    weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(fn):
        return lambda *qkv: jnp.sum(fn(*qkv) * weights)

    got = attention(q, k, v, segments, backend="tokamax")
    np.testing.assert_allclose(got, _reference(q, k, v, segments), rtol=1e-5, atol=2e-6)
    got_grads = jax.grad(loss(lambda *a: attention(*a, segments, backend="tokamax")), (0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(lambda *a: _reference(*a, segments)), (0, 1, 2))(q, k, v)
    for got_g, want_g in zip(got_grads, want_grads):
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0, 13, 24])
def test_queries_at_an_offset_read_their_own_documents(offset):
    """A context-parallel shard (scalar offset) or cache rows (one offset per row) against the whole row."""
    q, k, v = _qkv(4, 2, seed=1)
    segments = _segments()
    queries = q[:, offset:offset + 16]
    want = _reference(queries, k, v, segments, offset)
    for q_offset in (offset, jnp.asarray(offset), jnp.full((2, 1), offset)):
        got = attention(queries, k, v, segments[:, offset:offset + 16], backend="tokamax",
                        kv_segment_ids=segments, q_offset=q_offset)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_bf16_matches_the_xla_backend():
    q, k, v = _qkv(4, 2, jnp.bfloat16, seed=2)
    segments = _segments()
    got = attention(q, k, v, segments, backend="tokamax")
    assert got.dtype == jnp.bfloat16
    want = attention(q, k, v, segments, backend="xla")
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)


def test_auto_is_xla_off_gpu_and_unknown_names_are_refused():
    assert resolve_backend("auto") == ("tokamax" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="attention backend 'cudnn'"):
        resolve_backend("cudnn")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU kernel runs there")
def test_a_gpu_kernel_off_gpu_says_why():
    q, k, v = _qkv(4, 2)
    with pytest.raises(NotImplementedError, match="mosaic_gpu: Not supported"):
        tokamax_attention(q, k, v, _segments(), 0, 0.25, ("mosaic_gpu",))
