"""Mesh, logical-axis sharding rules, batch/parameter placement and multi-host start-up. Imports no other
package of cascade_jax, so every layer (ops, model, train, cli) may use it; what composes ops across devices
(expert dispatch, context-parallel sequence mixers) lives in `model/` beside the layers that call it."""

from cascade_jax.parallel.distributed import initialize_distributed
from cascade_jax.parallel.mesh import AXES, MeshConfig, MeshConfigError, make_mesh, mesh_context
from cascade_jax.parallel.rules import RULES, constrain, logical_to_spec, named_sharding
from cascade_jax.parallel.sharding import init_sharded, shard_batch, shard_tree, tree_shardings

__all__ = ["AXES", "RULES", "MeshConfig", "MeshConfigError", "constrain", "init_sharded", "initialize_distributed",
           "logical_to_spec", "make_mesh", "mesh_context", "named_sharding", "shard_batch", "shard_tree",
           "tree_shardings"]
