"""Row gathers for MoE dispatch whose gradients are gathers too.

Sorting (token, expert) assignments by expert and back, or into fixed send slots and back, only moves
rows; plain indexing would differentiate into a scatter-add into a zero buffer of the full [N·k, D] size.
XLA may create such a buffer long before it is used (it depends on nothing), for every layer at once.
When the inverse map is known the backward pass is a gather by it instead.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def inverse_permutation(order: Int[Array, "R"]) -> Int[Array, "R"]:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(x: Float[Array, "N D"], index: Int[Array, "S"], inverse: Int[Array, "R"], repeat: int = 1
                ) -> Float[Array, "S D"]:
    """out[s] = x[index[s] // repeat], or 0 where index[s] ≥ R = N·repeat.

    Think of x as R = N·repeat assignments (assignment j reads row j // repeat). `inverse[j]` is the one
    output row that reads assignment j, or any value ≥ S if none does; the caller guarantees the two maps
    agree (index[inverse[j]] = j). The gradient is then a gather by `inverse`, summed over each row's
    `repeat` assignments in fp32."""
    return jnp.take(x, index // repeat, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, index, inverse, repeat):
    return gather_rows(x, index, inverse, repeat), inverse


def _gather_rows_bwd(repeat, inverse, grad):
    by_assignment = jnp.take(grad, inverse, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    summed = by_assignment.reshape(-1, repeat, grad.shape[-1]).sum(axis=1)
    return summed.astype(grad.dtype), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def sort_rows(x: Float[Array, "N D"], order: Int[Array, "R"], repeat: int = 1) -> Float[Array, "R D"]:
    """x[order // repeat]: assignment i of R = N·repeat reads token i // repeat, taken in `order` (a
    permutation of the R assignments)."""
    return gather_rows(x, order, inverse_permutation(order), repeat)


def unsort_rows(rows: Float[Array, "R D"], order: Int[Array, "R"]) -> Float[Array, "R D"]:
    """Undo `rows = original[order]`."""
    return gather_rows(rows, inverse_permutation(order), order)
