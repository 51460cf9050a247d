from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.attention import attention, attention_mask, attention_reference
from cascade_jax.ops.flash_attention import flash_attention


def _inputs(seed, length, kv_length, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (2, kv_length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (2, kv_length, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], (2, length, heads, head_dim), jnp.float32)
    return q, k, v, d_out


def _packed(kv_length):
    """Row 0: one document; row 1: three documents and a padding tail (segment 0)."""
    a, b = kv_length // 4, kv_length // 2
    row = [1] * a + [2] * (b - a) + [3] * (kv_length - 3 - b) + [0] * 3
    return jnp.array([[1] * kv_length, row], jnp.int32)


def _reference(q, k, v, seg, kv_seg, q_offset, positions=None):
    """Explicit-mask reference; queries at q_offset + 0..T-1 unless `positions` [T] are given."""
    positions = q_offset + jnp.arange(q.shape[1]) if positions is None else positions
    positions = jnp.broadcast_to(positions, seg.shape)
    kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), kv_seg.shape)
    return attention_reference(q, k, v, attention_mask(seg, kv_seg, positions, kv_positions))


def _value_and_grads(fn, q, k, v, d_out):
    """Output and d<out, d_out>/d(q, k, v): the gradients of a random projection of the output."""
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out.astype(out.dtype))

    return jax.jit(run)(q, k, v, d_out)


def _assert_close(got, want, rtol=1e-5, atol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("length, block_q, block_kv", [(32, 8, 8), (13, 4, 5)])
def test_matches_reference_with_documents(length, block_q, block_kv):
    q, k, v, d_out = _inputs(length, length, length)
    seg = _packed(length)
    scale = q.shape[-1] ** -0.5
    flash = partial(flash_attention, segment_ids=seg, kv_segment_ids=seg, q_offset=0, scale=scale,
                   block_q=block_q, block_kv=block_kv)
    got = _value_and_grads(flash, q, k, v, d_out)
    chex.assert_shape(got[0], q.shape)
    _assert_close(got, _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, seg, 0), q, k, v, d_out))


def test_query_shard_with_traced_offset():
    """A shard's queries at a traced offset against every key give that slice of full attention, and its
    gradients are full attention's with the output cotangent zero outside the shard."""
    shards, part = 3, 7
    kv_length = shards * part
    q_all, k, v, d_all = _inputs(3, kv_length, kv_length)
    seg = _packed(kv_length)
    scale = q_all.shape[-1] ** -0.5

    @jax.jit
    def flash(q, d_out, seg_q, q_offset):
        fn = partial(flash_attention, segment_ids=seg_q, kv_segment_ids=seg, q_offset=q_offset, scale=scale,
                       block_q=3, block_kv=5)
        return _value_and_grads(fn, q, k, v, d_out)

    reference = jax.jit(lambda d: _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, seg, 0), q_all, k, v, d))
    for r in range(1, shards):
        rows = slice(r * part, (r + 1) * part)
        out, (dq, dk, dv) = flash(q_all[:, rows], d_all[:, rows], seg[:, rows], jnp.int32(r * part))
        want_out, (want_dq, want_dk, want_dv) = reference(jnp.zeros_like(d_all).at[:, rows].set(d_all[:, rows]))
        _assert_close((out, dq, dk, dv), (want_out[:, rows], want_dq[:, rows], want_dk, want_dv))


def test_rows_that_see_no_key_give_zeros():
    """Queries whose segment has no visible key (here: id 9, absent from the keys) output 0, get 0 grads."""
    q, k, v, d_out = _inputs(5, 6, 10)
    seg = jnp.array([[1, 1, 9, 1, 9, 1]] * 2, jnp.int32)
    kv_seg = jnp.ones((2, 10), jnp.int32)
    fn = partial(flash_attention, segment_ids=seg, kv_segment_ids=kv_seg, q_offset=4, scale=8 ** -0.5,
                   block_q=4, block_kv=4)
    out, (dq, dk, dv) = _value_and_grads(fn, q, k, v, d_out)
    empty = np.asarray(seg[0] == 9)
    for x in (out, dq, dk, dv):
        assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_array_equal(np.asarray(out)[:, empty], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[:, empty], 0.0)
    seen = ~empty
    want = _value_and_grads(
        lambda q, k, v: _reference(q[:, seen], k, v, seg[:, seen], kv_seg, 4, positions=4 + jnp.arange(6)[seen]),
        q, k, v, d_out[:, seen])
    _assert_close((out[:, seen], dq, dk, dv), (want[0], *want[1]))


def test_bfloat16_close_to_fp32_reference():
    q, k, v, d_out = _inputs(11, 40, 40, dtype=jnp.bfloat16)
    seg = _packed(40)
    fn = partial(flash_attention, segment_ids=seg, kv_segment_ids=seg, q_offset=0, scale=8 ** -0.5,
                   block_q=16, block_kv=16)
    got = _value_and_grads(fn, q, k, v, d_out)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    def up(x):
        return x.astype(jnp.float32)

    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, seg, 0), up(q), up(k), up(v), d_out)
    _assert_close(got, want, rtol=2e-2, atol=2e-2)   # bf16 inputs, tiles and cotangent: ~1e-2 off


def test_backend_registered_in_attention():
    q, k, v, _ = _inputs(2, 20, 20)
    seg = _packed(20)
    run = jax.jit(attention, static_argnames="backend")   # default block_size 512 > length: one block
    np.testing.assert_allclose(run(q, k, v, seg, backend="flash"), run(q, k, v, seg, backend="xla"),
                               rtol=1e-5, atol=1e-6)
