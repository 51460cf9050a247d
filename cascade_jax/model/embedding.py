"""Token embedding lookup that stays sharded under a mesh.

The table is stored [V, D] with D split over the `embed` rule's axes (FSDP) and V over `vocab`'s; the
activations it feeds are split by tokens (`batch`, `length`). Left to GSPMD, a gather from a D-split
table into token-split rows has no efficient resharding when D is split over two axes (fsdp × context):
XLA replicates the gathered [B, T, D] array on every device ("Involuntary full rematerialization"),
which at 262K-token rows is gigabytes. Here each device instead looks up its own D-slice for the tokens
of every device that shares that slice (token ids are small), then one all_to_all turns "all tokens ×
my D-slice" into "my tokens × all of D". The backward pass is the same all_to_all and a local
scatter-add into the device's slice, so the table's gradient never leaves its FSDP layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from cascade_jax.parallel.rules import logical_to_spec

TABLE_AXES = ("vocab", "embed")
IDS_AXES = ("batch", "length")


def embed_lookup(table: Float[Array, "V D"], ids: Int[Array, "B T"], dtype) -> Float[Array, "B T D"]:
    """`table[ids]` in `dtype`; under a mesh computed without replicating the result."""
    table = table.astype(dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.take(table, ids, axis=0)
    sizes = dict(mesh.shape)
    table_spec = logical_to_spec(TABLE_AXES, table.shape, sizes)
    ids_spec = logical_to_spec(IDS_AXES, ids.shape, sizes)
    vocab_axes, embed_axes = (_names(entry) for entry in table_spec)
    token_axes = {a for entry in ids_spec for a in _names(entry)}
    if not (vocab_axes or embed_axes) or not set(embed_axes) <= token_axes:
        # nothing to gather, or devices of one D-slice group hold the same tokens (e.g. one decoded token
        # per row, which the context axis cannot split): a small array GSPMD handles well
        return jnp.take(table, ids, axis=0)
    body = lambda t, i: _lookup_body(t, i, vocab_axes=vocab_axes, embed_axes=embed_axes)  # noqa: E731
    return jax.shard_map(body, in_specs=(table_spec, ids_spec), out_specs=P(*ids_spec, None))(table, ids)


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _lookup_body(table, ids, *, vocab_axes, embed_axes):
    """table: [V/tv, D/ne] local slice; ids: this device's [b, t] block."""
    rows = ids.reshape(-1)
    if embed_axes:   # the ids of every device holding another D-slice: [ne, b·t], major axis first
        rows = jax.lax.all_gather(rows, embed_axes)
    else:
        rows = rows[None]
    if vocab_axes:   # vocab-parallel: each rank holds a range of rows; the others contribute zeros
        first = jax.lax.axis_index(vocab_axes) * table.shape[0]
        local = rows - first
        inside = (local >= 0) & (local < table.shape[0])
        found = jnp.where(inside[..., None], jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0), 0)
        found = jax.lax.psum(found, vocab_axes)
    else:
        found = jnp.take(table, rows, axis=0)                      # [ne, b·t, D/ne]
    if embed_axes:   # send device j the rows of its tokens; receive my tokens' D-slices in D order
        found = jax.lax.all_to_all(found, embed_axes, split_axis=0, concat_axis=2, tiled=True)
    return found.reshape(*ids.shape, -1)
