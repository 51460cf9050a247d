"""The device mesh: five named axes whose sizes come from a config.

Axis order puts `tensor` innermost, so its collectives (every layer, twice) stay on the fastest links
(NVLink within a node), and `data` outermost, where only a gradient all-reduce per step crosses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "context", "tensor")


class MeshConfigError(ValueError):
    """A mesh that cannot be built on the devices present; the message is one line."""


@dataclasses.dataclass
class MeshConfig:
    """Sizes of the mesh axes; 1 = unused, -1 = all devices the other axes leave (at most one -1)."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 resolved; raises MeshConfigError when they do not multiply to num_devices."""
        given = {axis: getattr(self, axis) for axis in AXES}
        bad = [a for a, s in given.items() if s == 0 or s < -1]
        if bad:
            raise MeshConfigError(f"mesh.{bad[0]}={given[bad[0]]}: expected a positive size or -1")
        free = [a for a, s in given.items() if s == -1]
        if len(free) > 1:
            raise MeshConfigError(f"mesh: only one axis may be -1, got {', '.join(free)}")
        fixed = math.prod(s for s in given.values() if s != -1)
        if free:
            if num_devices % fixed:
                raise MeshConfigError(f"mesh: {num_devices} devices do not divide by the fixed axes' product {fixed}")
            given[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise MeshConfigError(f"mesh: axis sizes multiply to {fixed}, but there are {num_devices} devices")
        return given

    def is_single_device(self) -> bool:
        """All axes 1: the run takes the plain one-device path (no mesh, no collectives)."""
        return all(getattr(self, axis) == 1 for axis in AXES)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with Auto axes, so GSPMD
    propagates the shardings the rules table sets on parameters and a few activations."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.sizes(len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing for the one-device path; model code reads the mesh from here."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def axis_size(name: str) -> int:
    """Size of a mesh axis of the current (context) mesh; 1 when there is no mesh or no such axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]
