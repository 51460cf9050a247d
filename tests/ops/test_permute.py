"""Permutations with gather-only gradients equal plain indexing, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.ops.permute import inverse_permutation, sort_rows, unsort_rows


@pytest.mark.parametrize("repeat", [1, 3])
def test_sort_rows_matches_indexing(repeat):
    x = jax.random.normal(jax.random.key(0), (7, 5))
    order = jax.random.permutation(jax.random.key(1), 7 * repeat)
    weights = jax.random.normal(jax.random.key(2), (7 * repeat, 5))
    ours = jax.value_and_grad(lambda a: jnp.sum(sort_rows(a, order, repeat) * weights))(x)
    plain = jax.value_and_grad(lambda a: jnp.sum(a[order // repeat] * weights))(x)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-6, atol=1e-6)


def test_unsort_rows_undoes_sorting_and_matches_scatter():
    rows = jax.random.normal(jax.random.key(3), (9, 4))
    order = jax.random.permutation(jax.random.key(4), 9)
    weights = jax.random.normal(jax.random.key(5), (9, 4))
    np.testing.assert_array_equal(unsort_rows(rows[order], order), rows)
    np.testing.assert_array_equal(inverse_permutation(order)[order], jnp.arange(9))
    ours = jax.grad(lambda r: jnp.sum(unsort_rows(r, order) * weights))(rows)
    plain = jax.grad(lambda r: jnp.sum(jnp.zeros_like(r).at[order].set(r) * weights))(rows)
    np.testing.assert_allclose(ours, plain, rtol=1e-6)


def test_bf16_gradient_sums_copies_in_fp32():
    x = jnp.ones((1, 2), jnp.bfloat16)
    order = jnp.arange(300)
    grad = jax.grad(lambda a: jnp.sum(sort_rows(a, order, 300).astype(jnp.float32) * 1e-3))(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad, np.float32), 0.3, rtol=4e-3)


def test_gather_rows_with_empty_and_dropped_slots_matches_take():
    """Send slots as all_to_all fills them: some assignments dropped, some slots empty (index ≥ R)."""
    from cascade_jax.ops.permute import gather_rows

    x = jax.random.normal(jax.random.key(6), (4, 3))                       # 4 tokens, top-2 → 8 assignments
    slot = jnp.array([0, 5, 9, 2, 9, 1, 6, 3])                             # 9 = dropped (≥ 8 slots)
    filled_by = jnp.full((8,), 8).at[slot].set(jnp.arange(8), mode="drop")  # 8 = empty slot
    weights = jax.random.normal(jax.random.key(7), (8, 3))
    ours = jax.value_and_grad(lambda a: jnp.sum(gather_rows(a, filled_by, slot, 2) * weights))(x)
    plain = jax.value_and_grad(
        lambda a: jnp.sum(jnp.take(a, filled_by // 2, axis=0, mode="fill", fill_value=0) * weights))(x)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-6, atol=1e-7)
    back = jax.random.normal(jax.random.key(8), (8, 3))
    ours = jax.grad(lambda b: jnp.sum(gather_rows(b, slot, filled_by) * weights))(back)
    plain = jax.grad(lambda b: jnp.sum(jnp.take(b, slot, axis=0, mode="fill", fill_value=0) * weights))(back)
    np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-7)
