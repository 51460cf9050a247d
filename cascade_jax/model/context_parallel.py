"""Context parallelism: each row's tokens split into contiguous runs over the `context` mesh axis.

Token-local layers (projections, norms, MLP, MoE) need nothing. The three sequence mixers run under
`shard_map` and exchange only what crosses a rank boundary:

  conv       the left neighbour's last K-1 inputs and their segment ids (one ppermute);
  SSD        every rank scans its own tokens from a zero state; the ranks' final states ([H, P, N] per
             row) are all-gathered and folded left to right, and the incoming state's contribution
             C[t]·decay(start→t)·S_in is added to the tokens still in the incoming document;
  attention  keys, values and segment ids are all-gathered (Nemotron-H has 2 KV heads: small next to
             the queries); each rank attends with its own queries at their global offset.

Without a mesh, with `context` = 1, or when the length does not split, the plain ops run unchanged.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cascade_jax.ops.attention import attention, resolve_backend
from cascade_jax.ops.conv import causal_conv1d
from cascade_jax.ops.ssd import ssd_chunked
from cascade_jax.ops.ssd_pallas import ssd_pallas
from cascade_jax.parallel.rules import logical_to_spec

AXIS = "context"
SSD_BACKENDS = {"xla": ssd_chunked, "pallas": ssd_pallas}


def context_size(length: int, min_local: int = 1) -> int:
    """Ranks the context mesh axis splits a length-`length` row into (1: no context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    ranks = 1 if mesh.empty else mesh.shape.get(AXIS, 1)
    return ranks if ranks > 1 and length % ranks == 0 and length // ranks >= min_local else 1


def _spec(names, shape) -> P:
    mesh = jax.sharding.get_abstract_mesh()
    return logical_to_spec(names, shape, dict(mesh.shape))


def _heads_axis(*head_counts: int) -> str | None:
    """Split heads over `tensor` only if every head count divides (GQA / group mappings stay local)."""
    tp = jax.sharding.get_abstract_mesh().shape.get("tensor", 1)
    return "act_heads" if tp > 1 and all(n % tp == 0 for n in head_counts) else None


def _from_left(x: jax.Array, fill) -> jax.Array:
    """Each rank receives its left neighbour's `x`; rank 0 receives `fill`."""
    ranks = jax.lax.axis_size(AXIS)
    received = jax.lax.ppermute(x, AXIS, [(i, i + 1) for i in range(ranks - 1)])
    return jnp.where(jax.lax.axis_index(AXIS) == 0, jnp.asarray(fill, x.dtype), received)


# ----------------------------------------------------------------------------- conv
def sequence_conv(x, weight, bias, segment_ids):
    """`causal_conv1d` output (no state returned) for [B, T, C] inputs, context-parallel under a mesh."""
    if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
    if context_size(x.shape[1], min_local=weight.shape[0] - 1) == 1:
        return causal_conv1d(x, weight, bias, segment_ids)[0]
    rows = _spec(("batch", "length"), segment_ids.shape)
    channels = _spec(("batch", "length", "act_heads"), x.shape)
    if bias is None:
        bias = jnp.zeros(x.shape[-1:], weight.dtype)
    return jax.shard_map(_conv_body, in_specs=(channels, P(None, channels[2]), P(channels[2]), rows),
                         out_specs=channels)(x, weight, bias, segment_ids)


def _conv_body(x, weight, bias, segment_ids):
    history = weight.shape[0] - 1
    left = _from_left(x[:, -history:], 0)
    left_segments = _from_left(segment_ids[:, -history:], -1)   # -1 matches no document: rank 0 reads 0
    return causal_conv1d(x, weight, bias, segment_ids, state=left, state_segment_ids=left_segments)[0]


# ----------------------------------------------------------------------------- SSD
def sequence_ssd(x, dt, A, B, C, chunk_size: int, segment_ids, backend: str = "xla"):
    """`ssd_chunked` output y (fp32, [B, T, H, P]) for whole rows, context-parallel under a mesh; `backend`
    picks the scan (`SSD_BACKENDS`: XLA's chunked scan or the Pallas kernels)."""
    scan = SSD_BACKENDS[backend]
    if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
    if context_size(x.shape[1]) == 1:
        return scan(x, dt, A, B, C, chunk_size, segment_ids)[0]
    heads = _heads_axis(x.shape[2], B.shape[2])
    spec_x = _spec(("batch", "length", heads, None), x.shape)
    spec_dt = _spec(("batch", "length", heads), dt.shape)
    spec_bc = _spec(("batch", "length", heads, None), B.shape)
    rows = _spec(("batch", "length"), segment_ids.shape)
    return jax.shard_map(partial(_ssd_body, chunk_size=chunk_size, scan=scan),
                         in_specs=(spec_x, spec_dt, P(spec_dt[2]), spec_bc, spec_bc, rows),
                         out_specs=spec_x)(x, dt, A, B, C, segment_ids)


def _ssd_body(x, dt, A, B, C, segment_ids, *, chunk_size, scan):
    f32 = jnp.float32
    y, final = scan(x, dt, A, B, C, chunk_size, segment_ids)
    previous = jnp.concatenate([_from_left(segment_ids[:, -1:], -1), segment_ids[:, :-1]], axis=1)
    in_first_document = jnp.cumsum(segment_ids != previous, axis=1) == 0      # no document start yet
    log_decay = dt.astype(f32) * A.astype(f32)[None, None]                      # [B, L, H]
    decay_from_start = jnp.where(in_first_document[..., None], jnp.exp(jnp.cumsum(log_decay, axis=1)), 0.0)
    incoming = _incoming_state(final, decay_from_start[:, -1])                  # [B, H, P, N]
    C_heads = jnp.repeat(C.astype(f32), x.shape[2] // C.shape[2], axis=2)       # [B, L, H, N]
    return y + jnp.einsum("blhn,bhpn,blh->blhp", C_heads, incoming, decay_from_start)


def _incoming_state(final, carry_decay):
    """State entering this rank: fold the ranks to the left, S ← decay_r·S + final_r."""
    finals = jax.lax.all_gather(final, AXIS)                # [R, B, H, P, N], rank r from a zero state
    decays = jax.lax.all_gather(carry_decay, AXIS)          # [R, B, H], what survives through rank r

    def fold(state, rank):
        f, d = rank
        return d[..., None, None] * state + f, state

    _, entering = jax.lax.scan(fold, jnp.zeros_like(finals[0]), (finals, decays))
    return entering[jax.lax.axis_index(AXIS)]


# ----------------------------------------------------------------------------- attention
def sequence_attention(q, k, v, segment_ids, backend: str = "auto", block_size: int = 512):
    """`attention` over whole rows, context-parallel under a mesh (keys and values all-gathered)."""
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    ranks = context_size(q.shape[1])
    if ranks == 1:
        return attention(q, k, v, segment_ids, backend, block_size)
    heads = _heads_axis(q.shape[2], k.shape[2])
    spec_q = _spec(("batch", "length", heads, None), q.shape)
    spec_kv = _spec(("batch", "length", heads, None), k.shape)
    rows = _spec(("batch", "length"), segment_ids.shape)
    # The xla backend holds one query block's scores against every key, now R times as many keys: shrink
    # its block so that stays the same size. The others tile keys too, so their blocks need not change.
    backend = resolve_backend(backend)
    if backend == "xla":
        block_size = max(16, block_size // ranks)
    body = partial(_attention_body, backend=backend, block_size=block_size)
    return jax.shard_map(body, in_specs=(spec_q, spec_kv, spec_kv, rows), out_specs=spec_q)(q, k, v, segment_ids)


def _attention_body(q, k, v, segment_ids, *, backend, block_size):
    gather = partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    offset = jax.lax.axis_index(AXIS) * q.shape[1]
    return attention(q, gather(k), gather(v), segment_ids, backend, block_size,
                     kv_segment_ids=gather(segment_ids), q_offset=offset)
