"""Row permutations for MoE dispatch whose gradients are gathers too.

Sorting (token, expert) assignments by expert and back is a permutation; plain indexing would
differentiate into a scatter-add into a zero buffer of the full [N·k, D] size. XLA may create such a
buffer long before it is used (it depends on nothing), for every layer at once, so here the backward
pass of a permutation is the inverse permutation, gathered.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def inverse_permutation(order: Int[Array, "R"]) -> Int[Array, "R"]:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def sort_rows(x: Float[Array, "N D"], order: Int[Array, "R"], repeat: int = 1) -> Float[Array, "R D"]:
    """x[order // repeat]: assignment i of R = N·repeat reads token i // repeat, taken in `order`
    (a permutation of the R assignments)."""
    return x[order // repeat]


def _sort_rows_fwd(x, order, repeat):
    return x[order // repeat], order


def _sort_rows_bwd(repeat, order, grad):
    by_assignment = grad[inverse_permutation(order)].astype(jnp.float32)       # back to assignment order
    summed = by_assignment.reshape(-1, repeat, grad.shape[-1]).sum(axis=1)     # a token's `repeat` copies
    return summed.astype(grad.dtype), None


sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


@jax.custom_vjp
def unsort_rows(rows: Float[Array, "R D"], order: Int[Array, "R"]) -> Float[Array, "R D"]:
    """Undo `rows = original[order]`."""
    return rows[inverse_permutation(order)]


def _unsort_rows_fwd(rows, order):
    return unsort_rows(rows, order), order


def _unsort_rows_bwd(order, grad):
    return grad[order], None


unsort_rows.defvjp(_unsort_rows_fwd, _unsort_rows_bwd)
