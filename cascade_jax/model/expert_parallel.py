"""Expert parallelism: the routed-expert FFN under `shard_map`, experts split over the `expert` axis.

Each device holds E/ep experts (and, with `tensor` > 1, a slice of their hidden width F) and the tokens
of its own batch rows. Expert weights enter in their FSDP storage layout (the hidden size D split over
the `embed` rule's axes) and are all-gathered inside the shard_map, in the compute dtype they were cast
to: their gradients then leave through a reduce-scatter, so no device ever holds a full-size fp32 copy
of a layer's experts or of their gradients. Strategies differ only in how (token, expert) assignments reach the device that
owns the expert and how results come back:

  allgather          all-gather tokens over `expert`, compute the local experts' share for every token,
                     reduce-scatter the partial outputs. Dropless, works on every backend.
  all_to_all         a fixed [ep, capacity] buffer per destination, exchanged with all_to_all and back.
                     capacity_factor=None: the dropless bound; otherwise ⌈cf·n·k/ep⌉ slots, and
                     assignments past it are dropped and counted.
  ragged_all_to_all  exactly the routed rows, exchanged with ragged_all_to_all (GPU/TPU only: XLA:CPU
                     does not implement it). Dropless; the receive buffer has the dropless bound.

The per-expert math comes in as `ffn(rows, group_sizes, up, down)` (rows sorted by local expert, rows
past Σ group_sizes must give 0), so the dispatch is the same whichever grouped-matmul backend runs the experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cascade_jax.ops.permute import gather_rows, sort_rows, unsort_rows
from cascade_jax.parallel.rules import TOKEN_AXES, logical_to_spec

STRATEGIES = ("local", "allgather", "all_to_all", "ragged_all_to_all")
ExpertFFN = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def expert_parallel(x, weights, indices, up, down, ffn: ExpertFFN, *, strategy: str,
                    capacity_factor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Σ_j w_j · expert_{i_j}(x) per token under the context mesh; returns (out [N, D] fp32, dropped
    assignments summed over all devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    _check(strategy, mesh, up.shape[0], capacity_factor)
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    num_tokens, num_experts = x.shape[0], up.shape[0]
    pad = (-num_tokens) % shards     # e.g. decoding one token per row: pad with rows routed nowhere
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        indices = jnp.pad(indices, ((0, pad), (0, 0)), constant_values=num_experts)
    up_spec = logical_to_spec(("experts", "embed", "expert_mlp"), up.shape, dict(mesh.shape))
    down_spec = logical_to_spec(("experts", "expert_mlp", "embed"), down.shape, dict(mesh.shape))
    body = partial(_BODIES[strategy], ffn=ffn, num_experts=num_experts, capacity_factor=capacity_factor,
                   token_axes=token_axes, tensor=up_spec[2])
    tokens = P(token_axes, None)
    out, dropped = jax.shard_map(
        partial(_with_gathered_weights, body=body, fsdp=up_spec[1]),
        in_specs=(tokens, tokens, tokens, up_spec, down_spec),
        out_specs=(tokens, P()))(x, weights.astype(jnp.float32), indices.astype(jnp.int32), up, down)
    return out[:num_tokens], dropped


def _check(strategy, mesh, num_experts, capacity_factor):
    if strategy not in STRATEGIES[1:]:
        raise ValueError(f"moe_dispatch {strategy!r}: expected one of {list(STRATEGIES)}")
    if mesh.empty:
        raise ValueError(f"moe_dispatch {strategy!r} needs a mesh: run under cascade_jax.parallel.mesh_context(mesh)")
    ep = mesh.shape.get("expert", 1)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts do not split over mesh axis expert={ep}")
    if strategy == "ragged_all_to_all" and jax.default_backend() == "cpu":
        raise ValueError("moe_dispatch 'ragged_all_to_all' needs GPU or TPU: XLA:CPU does not implement "
                         "ragged_all_to_all; use 'all_to_all' or 'allgather' on CPU")
    if capacity_factor is not None and strategy != "all_to_all":
        raise ValueError(f"moe_capacity_factor applies to moe_dispatch 'all_to_all' only, not {strategy!r}")


# ----------------------------------------------------------------------------- shared pieces
def _with_gathered_weights(x, w, idx, up, down, *, body, fsdp):
    """Gather the D dimension of this rank's experts (split over `fsdp`) before the strategy runs."""
    if fsdp is not None:
        # Tie the gather to this layer's input: otherwise schedulers may hoist every layer's gather (they
        # depend only on parameters) to the start of the step, holding all of them at once.
        x, up, down = jax.lax.optimization_barrier((x, up, down))
        up = jax.lax.all_gather(up, fsdp, axis=1, tiled=True)
        down = jax.lax.all_gather(down, fsdp, axis=2, tiled=True)
    return body(x, w, idx, up, down)


def _local_ffn(rows, local_ids, num_local, ffn, up, down, repeat=1):
    """ffn on assignments tagged with a local expert id (num_local = not here); assignment i reads row
    i // repeat, and results come back in assignment order."""
    order = jnp.argsort(local_ids, stable=True)
    sizes = jnp.bincount(local_ids, length=num_local + 1)[:num_local]
    out = unsort_rows(ffn(sort_rows(rows, order, repeat), sizes, up, down), order)
    return jnp.where((local_ids < num_local)[:, None], out, 0)   # kernels need not zero the tail


def _combine(out, weights):
    """[N·k, D] per-assignment outputs → Σ_j w_j · out_j in fp32, [N, D]."""
    num_tokens, top_k = weights.shape
    return (out.reshape(num_tokens, top_k, -1).astype(jnp.float32) * weights[..., None]).sum(axis=1)


def _reduce_tensor(y, tensor):
    """With F split over `tensor`, each rank holds a partial sum of the down projection."""
    return y if tensor is None else jax.lax.psum(y, tensor)


def _ranks(keys, num_keys):
    """Position of each entry among the entries with the same key, in input order."""
    order = jnp.argsort(keys, stable=True)
    counts = jnp.bincount(keys, length=num_keys)
    starts = jnp.cumsum(counts) - counts
    ranked = jnp.arange(keys.shape[0]) - starts[keys[order]]
    return jnp.zeros_like(keys).at[order].set(ranked)


# ----------------------------------------------------------------------------- strategies
def _allgather(x, w, idx, up, down, *, ffn, num_experts, capacity_factor, token_axes, tensor):
    num_local, top_k = up.shape[0], idx.shape[1]
    xg = jax.lax.all_gather(x, "expert", tiled=True)
    wg = jax.lax.all_gather(w, "expert", tiled=True)
    ig = jax.lax.all_gather(idx, "expert", tiled=True)
    local = ig - jax.lax.axis_index("expert") * num_local
    local = jnp.where((local >= 0) & (local < num_local), local, num_local).reshape(-1)
    out = _local_ffn(xg, local, num_local, ffn, up, down, repeat=top_k)
    y = jax.lax.psum_scatter(_combine(out, wg), "expert", scatter_dimension=0, tiled=True)
    return _reduce_tensor(y, tensor), jnp.zeros((), jnp.int32)


def _all_to_all(x, w, idx, up, down, *, ffn, num_experts, capacity_factor, token_axes, tensor):
    num_local, (num_tokens, top_k) = up.shape[0], idx.shape
    ep = num_experts // num_local
    capacity = num_tokens * min(top_k, num_local)          # dropless: every assignment to one device
    if capacity_factor is not None:
        capacity = min(capacity, max(1, math.ceil(capacity_factor * num_tokens * top_k / ep)))
    flat = idx.reshape(-1)
    dest = flat // num_local                               # padding rows (id = E) → ep: sent nowhere
    routed = dest < ep
    position = _ranks(dest, ep + 1)
    keep = routed & (position < capacity)
    slot = jnp.where(keep, dest * capacity + position, ep * capacity)   # out of range → dropped
    # Which assignment fills each send slot (N·k = none): with both maps, sending and returning are gathers
    # in both passes, so no zero-filled [ep·capacity, D] buffer exists for a scheduler to create early.
    filled_by = jnp.full((ep * capacity,), flat.shape[0], jnp.int32).at[slot].set(
        jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")
    send = gather_rows(x, filled_by, slot, top_k)
    send_ids = jnp.take(flat % num_local, filled_by, mode="fill", fill_value=num_local)
    recv = jax.lax.all_to_all(send.reshape(ep, capacity, -1), "expert", 0, 0)
    recv_ids = jax.lax.all_to_all(send_ids.reshape(ep, capacity), "expert", 0, 0)
    out = _local_ffn(recv.reshape(ep * capacity, -1), recv_ids.reshape(-1), num_local, ffn, up, down)
    back = jax.lax.all_to_all(out.reshape(ep, capacity, -1), "expert", 0, 0).reshape(ep * capacity, -1)
    results = gather_rows(back, slot, filled_by)
    dropped = jax.lax.psum(jnp.sum(routed & ~keep, dtype=jnp.int32), token_axes)
    return _reduce_tensor(_combine(results, w), tensor), dropped


def _ragged_all_to_all(x, w, idx, up, down, *, ffn, num_experts, capacity_factor, token_axes, tensor):
    num_local, (num_tokens, top_k) = up.shape[0], idx.shape
    ep = num_experts // num_local
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)                 # by expert, hence by destination; padding last
    send = jnp.repeat(x, top_k, axis=0)[order]
    send_ids = (flat % num_local)[order]
    sizes = jnp.bincount(flat // num_local, length=ep + 1)[:ep].astype(jnp.int32)   # rows to each device
    table = jax.lax.all_gather(sizes, "expert")            # [source, destination]
    me = jax.lax.axis_index("expert")
    before_me = (jnp.cumsum(table, axis=0) - table)[me]    # where my rows land in each destination
    recv_sizes = table[:, me]
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    send_offsets = jnp.cumsum(sizes) - sizes
    bound = ep * num_tokens * min(top_k, num_local)        # dropless receive buffer
    exchange = partial(jax.lax.ragged_all_to_all, axis_name="expert")
    recv = exchange(send, jnp.zeros((bound, x.shape[1]), x.dtype), send_offsets, sizes, before_me, recv_sizes)
    recv_ids = exchange(send_ids, jnp.full((bound,), num_local, jnp.int32), send_offsets, sizes, before_me,
                        recv_sizes)
    out = _local_ffn(recv, recv_ids, num_local, ffn, up, down)
    # Back: the rows from source s return to where s sent them from (its send offset towards me).
    their_offsets = (jnp.cumsum(table, axis=1) - table)[:, me]
    back = exchange(out, jnp.zeros_like(send), recv_offsets, recv_sizes, their_offsets, sizes)
    results = unsort_rows(back, order)
    return _reduce_tensor(_combine(results, w), tensor), jnp.zeros((), jnp.int32)


_BODIES = {"allgather": _allgather, "all_to_all": _all_to_all, "ragged_all_to_all": _ragged_all_to_all}
