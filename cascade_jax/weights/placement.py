"""Where loaded parameters go: the caller's mesh and partition specs.

`partition` (for `load_pretrained(..., mesh=, partition=)`) is one of
  - None: every parameter replicated on the mesh;
  - a callable `(path, variable) -> PartitionSpec | None`, given the NNX path such as
    ('layers', 1, 'mixer', 'up_proj') and the abstract variable (`.shape`, `.dtype`, and the
    `logical_axes` metadata, e.g. ('experts', 'embed', 'expert_mlp')), so logical-axis rules plug in as
    `partition=lambda path, v: rules.spec(v.logical_axes)`;
  - a dict {path: PartitionSpec}; paths it does not name are replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


def param_sharding(mesh: Mesh | None, partition, path: tuple, variable) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    if callable(partition):
        spec = partition(path, variable)
    elif isinstance(partition, dict):
        spec = partition.get(path)
    elif partition is None:
        spec = None
    else:
        raise TypeError("partition must be None, a callable (path, variable) -> PartitionSpec, or a dict")
    if isinstance(spec, NamedSharding):
        return spec
    return NamedSharding(mesh, spec if spec is not None else PartitionSpec())


PartitionFn = Callable[[tuple, object], PartitionSpec | None]
