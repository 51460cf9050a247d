"""Placing pytrees on a mesh: NNX variables by their `logical_axes`, batches by the batch rules.

Optimizer state follows the parameters for free: optax builds `mu`/`nu` with `jax.tree.map` over the
parameter State, so its leaves are the same NNX Variables, metadata included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax.parallel.rules import RULES, logical_to_spec, named_sharding


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(mesh: Mesh, variable, rules=RULES) -> NamedSharding:
    """The variable's logical axes through the rules; variables without names are replicated."""
    names = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if names is None:
        return NamedSharding(mesh, PartitionSpec())
    return named_sharding(mesh, names, shape, rules)


def tree_shardings(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """A sharding per leaf of any pytree holding NNX Variables (model State, TrainState, opt state):
    variables by their logical axes, everything else (step counters, rng keys) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: variable_sharding(mesh, x, rules) if _is_variable(x) else replicated,
                        tree, is_leaf=_is_variable)


def init_sharded(build: Callable[[], Any], mesh: Mesh, rules=RULES) -> Any:
    """Run `build` (a pure function returning a pytree) under jit with every output created directly in
    its sharding, so no device ever holds the full tree. Shapes come from `jax.eval_shape`."""
    abstract = jax.eval_shape(build)
    return jax.jit(build, out_shardings=tree_shardings(abstract, mesh, rules))()


def shard_tree(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """Move an existing pytree (e.g. a loaded model's State) onto the mesh by the rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], rules=RULES) -> NamedSharding:
    """[B, T] → rows over the batch axes, tokens over `context`; [A, B, T] keeps the micro-batch axis whole."""
    names = ("batch", "length") if len(shape) == 2 else (None, "batch", "length")
    return NamedSharding(mesh, logical_to_spec(names, None, dict(mesh.shape), rules))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules=RULES) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`make_array_from_process_local_data`): with several
    processes each one passes only the rows its data shard produced."""
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, local.shape, rules)
        rows_axis = local.ndim - 2
        # Meshes are process-major, so each process owns an equal, contiguous run of the row shards.
        local_shards = max(1, _num_shards(sharding, rows_axis) // jax.process_count())
        if local.shape[rows_axis] % local_shards:
            raise ValueError(f"batch {key!r}: {local.shape[rows_axis]} rows per process do not split into "
                             f"{local_shards} shards over the batch mesh axes; set data.batch_size to a multiple")
        out[key] = jax.make_array_from_process_local_data(sharding, local)
    return out


def _num_shards(sharding: NamedSharding, axis: int) -> int:
    entry = sharding.spec[axis] if axis < len(sharding.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=np.int64))


def constrain_tree(tree: Any, rules=RULES) -> Any:
    """Inside jit, pin every leaf of a Variable-holding pytree to its rule sharding on the context mesh
    (replicated when unnamed), so a step returns its state exactly as it received it (donation works,
    nothing recompiles). A no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree

    def pin(x):
        names = x.get_metadata().get("logical_axes") if _is_variable(x) else None
        value = x.get_value() if _is_variable(x) else x
        spec = PartitionSpec() if names is None else logical_to_spec(names, value.shape, dict(mesh.shape), rules)
        return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, spec), x)

    return jax.tree.map(pin, tree, is_leaf=_is_variable)
