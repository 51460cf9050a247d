"""Where loaded parameters go: the caller's mesh and partition specs, or the converter's row split.

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
import numpy as np
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


def row_split_sharding(shape: tuple[int, ...], axis: int, devices=None) -> jax.sharding.Sharding:
    """Split `axis` across the host's CPU devices, so an array is built (and saved) one block at a time.

    Arrays whose axis does not divide evenly stay on one device (they are small: norms, biases, heads).
    """
    devices = devices if devices is not None else jax.devices("cpu")
    if shape and len(devices) > 1 and shape[axis] % len(devices) == 0:
        spec = [None] * len(shape)
        spec[axis] = "rows"
        return NamedSharding(Mesh(np.array(devices), ("rows",)), PartitionSpec(*spec))
    return SingleDeviceSharding(devices[0])


def blocks_in_order(array: jax.Array, axis: int):
    """Yield (start along `axis`, host block) for each distinct shard, in order along `axis`."""
    starts = {}
    for shard in array.addressable_shards:
        start = shard.index[axis].indices(array.shape[axis])[0] if array.ndim else 0
        starts.setdefault(start, shard)
    for start in sorted(starts):
        yield start, np.asarray(starts[start].data)


PartitionFn = Callable[[tuple, object], PartitionSpec | None]
