import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.attention import attention, attention_mask, attention_reference


@pytest.mark.parametrize("length, heads, kv_heads, block", [
    (1, 2, 1, 512), (13, 4, 2, 512), (32, 6, 3, 8), (20, 4, 4, 7), (45, 2, 1, 2)])  # 45/2: the lax.map path
def test_attention_matches_reference(length, heads, kv_heads, block):
    k = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(k[0], (2, length, heads, 8))
    kk = jax.random.normal(k[1], (2, length, kv_heads, 8))
    v = jax.random.normal(k[2], (2, length, kv_heads, 8))
    cut = max(1, length // 3)
    seg = jnp.array([[1] * length, [1] * cut + [2] * (length - cut)], jnp.int32)
    index = jnp.broadcast_to(jnp.arange(length), (2, length))
    mask = attention_mask(seg, seg, index, index)
    out = attention(q, kk, v, seg, block_size=block)
    chex.assert_shape(out, q.shape)
    np.testing.assert_allclose(out, attention_reference(q, kk, v, mask), rtol=1e-5, atol=1e-6)


def test_mask_is_block_diagonal_causal():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    index = jnp.arange(6)[None]
    mask = np.asarray(attention_mask(seg, seg, index, index)[0])
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


def test_unknown_backend_is_a_clear_error():
    q = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="attention backend 'nope'"):
        attention(q, q, q, jnp.ones((1, 2), jnp.int32), backend="nope")


@pytest.mark.parametrize("shards, block", [(2, 512), (3, 4)])
def test_query_shard_against_all_keys(shards, block):
    """A shard's queries (q_offset) against every token's keys equal that slice of full attention."""
    length = 12 * shards
    k = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(k[0], (2, length, 4, 8))
    kk = jax.random.normal(k[1], (2, length, 2, 8))
    v = jax.random.normal(k[2], (2, length, 2, 8))
    seg = jnp.array([[1] * length, [1] * 5 + [2] * (length - 9) + [0] * 4], jnp.int32)
    full = attention(q, kk, v, seg)
    part = length // shards
    for r in range(shards):
        rows = slice(r * part, (r + 1) * part)
        got = attention(q[:, rows], kk, v, seg[:, rows], block_size=block, kv_segment_ids=seg, q_offset=r * part)
        np.testing.assert_allclose(got, full[:, rows], rtol=1e-5, atol=1e-6)
