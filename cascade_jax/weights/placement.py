"""Where loaded parameters go: the caller's mesh and partition specs.

`partition` (for `load_pretrained(..., mesh=, partition=)`) is one of
  - None: the project's logical-axis rules (`cascade_jax.parallel.rules.RULES`), as training shards them:
    experts over `expert`, matrices over `fsdp` (× `context`), heads over `tensor`;
  - "replicated": every parameter whole on every device;
  - a callable `(path, variable) -> PartitionSpec | NamedSharding | None`, given the NNX path such as
    ('layers', 1, 'mixer', 'up_proj') and the abstract variable (`.shape`, `.dtype`, and the
    `logical_axes` metadata, e.g. ('experts', 'embed', 'expert_mlp')); None replicates;
  - a dict {path: PartitionSpec}; paths it does not name are replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from cascade_jax.parallel.sharding import variable_sharding


def param_sharding(mesh: Mesh | None, partition, path: tuple, variable) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    if partition is None:
        return variable_sharding(mesh, variable)
    if callable(partition):
        spec = partition(path, variable)
    elif isinstance(partition, dict):
        spec = partition.get(path)
    elif partition == "replicated":
        spec = None
    else:
        raise TypeError("partition must be None (the rules table), 'replicated', a callable "
                        "(path, variable) -> PartitionSpec, or a dict {path: PartitionSpec}")
    if isinstance(spec, NamedSharding):
        return spec
    return NamedSharding(mesh, spec if spec is not None else PartitionSpec())

