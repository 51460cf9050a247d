"""Grouped matmul for dropless MoE: rows sorted by expert, each group multiplied by its own weight.

`grouped_matmul(x, w, group_sizes)` computes out[r] = x[r] @ w[g(r)], where rows 0..sizes[0]-1 belong
to group 0, the next sizes[1] rows to group 1, and so on. Rows past sum(group_sizes) give 0.

Backends are chosen by name (`Backends.grouped_matmul`): `tokamax` (tokamax.ragged_dot: its Pallas
Mosaic-GPU kernels, with backward, on sm90), `ragged_dot` (XLA's), `tiled` (a dropless batched matmul
for XLA:CPU), `xla` (`ragged_dot` on GPU/TPU, `tiled` on CPU) and `auto` (`tokamax` on GPU, `xla`
elsewhere). `register_backend` adds one (cascade-plan's stand-in for XLA:CPU does), `backend_names()`
lists them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _ragged_dot(x, w, group_sizes, preferred_element_type):
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _tiled(x, w, group_sizes, preferred_element_type, tile: int = 64):
    """Rows cut into fixed tiles that never straddle two groups, then one batched matmul over tiles.

    Exact and dropless: a group of s rows takes ceil(s / tile) tiles, so R // tile + E tiles always
    suffice. XLA's CPU backend has no native ragged_dot lowering (it multiplies every row by every
    group's weight); this costs at most E · tile padded rows instead.
    """
    rows, num_groups = x.shape[0], w.shape[0]
    tile = max(1, min(tile, rows))
    num_tiles = rows // tile + num_groups
    tiles_per_group = (group_sizes + tile - 1) // tile
    first_tile = jnp.cumsum(tiles_per_group) - tiles_per_group
    first_row = jnp.cumsum(group_sizes) - group_sizes
    tile_index = jnp.arange(num_tiles)
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_per_group), tile_index, side="right"), num_groups - 1)
    offset = (tile_index - first_tile[group])[:, None] * tile + jnp.arange(tile)[None, :]   # row within group
    valid = (offset < group_sizes[group][:, None]) & (offset >= 0)
    source = jnp.where(valid, first_row[group][:, None] + offset, rows)                    # rows = out of range
    x_tiles = jnp.take(x, source, axis=0, mode="fill", fill_value=0)                         # [tiles, tile, I]
    y_tiles = jnp.einsum("tmi,tio->tmo", x_tiles, w[group], preferred_element_type=preferred_element_type)
    out = jnp.zeros((rows, w.shape[-1]), y_tiles.dtype)
    return out.at[source.reshape(-1)].add(y_tiles.reshape(-1, w.shape[-1]), mode="drop")


def _xla(x, w, group_sizes, preferred_element_type):
    """lax.ragged_dot where XLA lowers it natively (GPU, TPU); the tiled form on CPU."""
    if jax.default_backend() == "cpu":
        return _tiled(x, w, group_sizes, preferred_element_type)
    return _ragged_dot(x, w, group_sizes, preferred_element_type)


def _tokamax(x, w, group_sizes, preferred_element_type):
    import tokamax  # imported lazily: only the GPU path needs it

    return tokamax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _auto(x, w, group_sizes, preferred_element_type):
    backend = _tokamax if jax.default_backend() == "gpu" else _xla
    return backend(x, w, group_sizes, preferred_element_type)


# fn(x [R, I], w [E, I, O] in x's dtype, group_sizes [E] int32, preferred_element_type) -> [R, O]
GroupedMatmulFn = Callable[..., jax.Array]

_BACKENDS: dict[str, GroupedMatmulFn] = {"xla": _xla, "ragged_dot": _ragged_dot, "tiled": _tiled,
                                         "tokamax": _tokamax, "auto": _auto}


def register_backend(name: str, fn: GroupedMatmulFn) -> None:
    """Make `fn` selectable as `grouped_matmul(..., backend=name)`. Registering the same function under
    the same name again is a no-op; a different function under a name already taken is a ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"grouped_matmul backend name: expected a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"grouped_matmul backend {name!r}: expected a callable, got {type(fn).__name__}")
    existing = _BACKENDS.get(name)
    if existing is not None and existing is not fn:
        raise ValueError(f"grouped_matmul backend {name!r} is already registered "
                         f"(to {getattr(existing, '__qualname__', existing)}); pick another name")
    _BACKENDS[name] = fn


def backend_names() -> tuple[str, ...]:
    """The registered backend names, sorted."""
    return tuple(sorted(_BACKENDS))


def grouped_matmul(
    x: Float[Array, "R I"],
    w: Float[Array, "E I O"],
    group_sizes: Int[Array, "E"],
    backend: str = "auto",
) -> Float[Array, "R O"]:
    """Accumulates in fp32 and returns x's dtype."""
    if backend not in _BACKENDS:
        raise ValueError(f"grouped_matmul backend {backend!r}: expected one of {list(backend_names())}")
    out = _BACKENDS[backend](x, w.astype(x.dtype), group_sizes.astype(jnp.int32), jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul_reference(x, w, group_sizes):
    """Loop over groups with a row mask (slow, obviously right)."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(x.shape[0])
    out = jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32)
    for e in range(w.shape[0]):
        in_group = (rows >= starts[e]) & (rows < ends[e])
        out = out + jnp.where(in_group[:, None], x.astype(jnp.float32) @ w[e].astype(jnp.float32), 0.0)
    return out.astype(x.dtype)
