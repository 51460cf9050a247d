"""Mesh, logical-axis sharding rules, expert dispatch and multi-host start-up. Imports no other package
of cascade_jax, so every layer (model, train, cli) may use it."""

from cascade_jax.parallel.distributed import initialize_distributed
from cascade_jax.parallel.experts import STRATEGIES, expert_parallel
from cascade_jax.parallel.mesh import AXES, MeshConfig, MeshConfigError, make_mesh, mesh_context
from cascade_jax.parallel.rules import RULES, constrain, logical_to_spec, named_sharding
from cascade_jax.parallel.sharding import init_sharded, shard_batch, shard_tree, tree_shardings

__all__ = ["AXES", "RULES", "STRATEGIES", "MeshConfig", "MeshConfigError", "constrain", "expert_parallel",
           "init_sharded", "initialize_distributed", "logical_to_spec", "make_mesh", "mesh_context",
           "named_sharding", "shard_batch", "shard_tree", "tree_shardings"]
