"""The one logical-axis rules table: logical dimension names → mesh axes.

Parameters carry names such as ("experts", "embed", "expert_mlp") in their `logical_axes` metadata;
activations are named at the few places the model pins them. Everything else is left to GSPMD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A mesh axis name, a tuple of them (the dimension is split over their product, major first), or None.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",            # embedding rows / lm_head columns: vocab-parallel
    "embed": ("fsdp", "context"), # hidden size: the FSDP split of every matrix (gathered before use); context
                                  # ranks hold different tokens of the same rows, so they share the FSDP work
    "q_heads": "tensor",          # attention heads (Megatron column/row parallel q,k,v / o)
    "kv_heads": "tensor",
    "mamba_in_proj": "tensor",    # Mamba heads: in_proj columns, conv channels, per-head vectors, out_proj rows
    "mamba_conv": "tensor",
    "mamba_heads": "tensor",
    "mamba_inner": "tensor",
    "experts": "expert",          # expert parallelism
    "expert_mlp": "tensor",       # expert hidden width
    "mlp": "tensor",
    "shared_mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp", "expert"),   # every replica, FSDP rank and EP rank reads its own rows
    "length": "context",
    "tokens": ("data", "fsdp", "expert", "context"),   # a flattened [B·T] token axis
    "act_embed": None,            # the residual stream stays whole on each tensor rank
    "act_heads": "tensor",
    "act_vocab": "tensor",
}

BATCH_AXES = ("data", "fsdp", "expert")
TOKEN_AXES = RULES["tokens"]   # axes over which flattened [B·T] tokens are split


def mesh_axes(name: str | None, rules=RULES) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no entry in the rules table (cascade_jax.parallel.rules.RULES)")
    target = rules[name]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh_shape: dict[str, int],
                    rules=RULES) -> PartitionSpec:
    """PartitionSpec for a dimension-name tuple. Axes of size 1 or absent from the mesh are skipped, a mesh
    axis is used at most once, and a dimension that does not divide by its axes falls back to fewer
    (minor axes dropped first) so any model size still shards where it can."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = [a for a in mesh_axes(name, rules) if mesh_shape.get(a, 1) > 1 and a not in used]
        if shape is not None:
            while axes and shape[i] % math.prod(mesh_shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
    """Pin an activation's sharding under the context mesh (`jax.set_mesh`); a no-op without one, so the
    one-device path is untouched."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape), rules))
