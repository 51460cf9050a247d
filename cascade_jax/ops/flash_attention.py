"""Memory-efficient ("flash") attention in pure JAX: blockwise online softmax with a custom VJP.

Same semantics as `attention.attention_mask`: key s (position s) is visible to query t (position
q_offset + t) iff both carry the same segment id and s ≤ q_offset + t. Only one [block_q, block_kv] tile
of scores per (batch, head) exists at a time, in the forward and in the backward pass; the backward pass
recomputes the tiles from the saved log-sum-exp (FlashAttention-2). Query rows that see no key output 0
and get 0 gradients.

Internally queries are laid out [B, K, G, T, P] (G = H / K query heads per kv head) and keys [B, K, S, P],
so grouped-query attention is a plain batched matmul and dK, dV sum over G inside the einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Padded rows get segment ids that match nothing (real ids are ≥ 0), so padding needs no extra mask.
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -1, -2


def flash_attention(
    q: Float[Array, "B T H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    segment_ids: Int[Array, "B T"],
    kv_segment_ids: Int[Array, "B S"],
    q_offset: int | Int[Array, ""],
    scale: float,
    block_q: int = 512,
    block_kv: int = 512,
) -> Float[Array, "B T H P"]:
    """softmax(q kᵀ · scale + document-causal mask) v, in q.dtype; q_offset may be traced."""
    # A block longer than the sequence would only add padding.
    block_q, block_kv = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
    q_offset = jnp.asarray(q_offset, jnp.int32)
    return _flash(q, k, v, segment_ids, kv_segment_ids, q_offset, float(scale), block_q, block_kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_q, block_kv):
    return _forward(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_q, block_kv)[0]


def _flash_fwd(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_q, block_kv):
    out, lse = _forward(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_q, block_kv)
    return out, (q, k, v, segment_ids, kv_segment_ids, q_offset, out, lse)


def _flash_bwd(scale, block_q, block_kv, residuals, d_out):
    q, k, v, segment_ids, kv_segment_ids, q_offset, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, segment_ids, kv_segment_ids, q_offset, out, lse, d_out, scale, block_q,
                           block_kv)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, axis, block, value=0):
    pad = -x.shape[axis] % block
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _grouped(x, kv_heads, block):
    """[B, T, H, ...] → [B, K, G, T_padded, ...]: query-side arrays with heads grouped by kv head."""
    x = _pad_to(x, 1, block)
    batch, length, heads = x.shape[:3]
    x = x.reshape(batch, length, kv_heads, heads // kv_heads, *x.shape[3:])
    return jnp.moveaxis(x, 1, 3)


def _ungrouped(x, length):
    """Inverse of `_grouped`, padded rows dropped."""
    x = jnp.moveaxis(x, 3, 1)
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])[:, :length]


def _kv_layout(x, block):
    """[B, S, K, P] → [B, K, S_padded, P]."""
    return _pad_to(x, 1, block).swapaxes(1, 2)


def _tile(q_blk, k_blk, q_seg, kv_seg, q_pos, kv_pos, scale):
    """Scaled scores of one tile [B, K, G, bq, bkv] in fp32, -inf where the key is not visible."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    visible = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_pos[None, :] <= q_pos[:, None])
    return jnp.where(visible[:, None, None], scores, -jnp.inf)


def _zeros(shape, *like):
    """fp32 zeros that vary over the same shard_map axes as `like` together: a loop's carry must have the
    axis types of what the loop body returns (queries and keys may vary over different mesh axes)."""
    out = jnp.zeros(shape, jnp.float32)
    for x in like:
        out = out + jnp.zeros_like(jnp.ravel(x)[:1], jnp.float32)[0]
    return out


def _last_kv_block(q_offset, q_block, block_q, block_kv, kv_blocks):
    """Key blocks at index ≥ this hold only keys after every query of the block (causal skipping)."""
    last_position = q_offset + (q_block + 1) * block_q - 1
    return jnp.clip(last_position // block_kv + 1, 0, kv_blocks)


def _first_q_block(q_offset, kv_block, block_q, block_kv, q_blocks):
    """Query blocks at index < this end before the key block starts, so they see none of its keys."""
    return jnp.clip((kv_block * block_kv - q_offset) // block_q, 0, q_blocks)


def _forward(q, k, v, segment_ids, kv_segment_ids, q_offset, scale, block_q, block_kv):
    """Output [B, T, H, P] in q.dtype and log-sum-exp of the scaled scores [B, H, T] in fp32."""
    length, kv_heads = q.shape[1], k.shape[2]
    qg = _grouped(q, kv_heads, block_q)
    kt, vt = _kv_layout(k, block_kv), _kv_layout(v, block_kv)
    q_seg = _pad_to(segment_ids, 1, block_q, _PAD_Q_SEGMENT)
    kv_seg = _pad_to(kv_segment_ids, 1, block_kv, _PAD_KV_SEGMENT)
    q_blocks, kv_blocks = qg.shape[3] // block_q, kt.shape[2] // block_kv

    def one_q_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(qg, i * block_q, block_q, axis=3)
        seg_blk = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)
        q_pos = q_offset + i * block_q + jnp.arange(block_q)

        def one_kv_block(j, carry):
            running_max, running_sum, acc = carry
            start = j * block_kv
            scores = _tile(q_blk, jax.lax.dynamic_slice_in_dim(kt, start, block_kv, axis=2), seg_blk,
                           jax.lax.dynamic_slice_in_dim(kv_seg, start, block_kv, axis=1), q_pos,
                           start + jnp.arange(block_kv), scale)
            new_max = jnp.maximum(running_max, scores.max(-1))
            # A row that has seen only masked keys keeps max -inf; shifting by 0 keeps its terms exp(-inf) = 0.
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            probs = jnp.exp(scores - shift[..., None])
            rescale = jnp.exp(running_max - shift)
            v_blk = jax.lax.dynamic_slice_in_dim(vt, start, block_kv, axis=2)
            pv = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            return new_max, rescale * running_sum + probs.sum(-1), rescale[..., None] * acc + pv

        stats_shape = q_blk.shape[:-1]
        init = (_zeros(stats_shape, q_blk, kt, q_offset) - jnp.inf, _zeros(stats_shape, q_blk, kt, q_offset),
                _zeros(q_blk.shape, q_blk, kt, q_offset))
        last = _last_kv_block(q_offset, i, block_q, block_kv, kv_blocks)
        running_max, running_sum, acc = jax.lax.fori_loop(0, last, one_kv_block, init)
        seen = running_sum > 0
        out = acc / jnp.where(seen, running_sum, 1.0)[..., None]
        # +inf for a row that saw nothing: the backward pass then recomputes its probabilities as exp(-inf) = 0.
        lse = jnp.where(seen, running_max + jnp.log(jnp.where(seen, running_sum, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one_q_block, jnp.arange(q_blocks))          # [n, B, K, G, bq, (P)]
    out = jnp.moveaxis(out, 0, 3).reshape(qg.shape)
    lse = jnp.moveaxis(lse, 0, 3).reshape(qg.shape[:-1])
    return _ungrouped(out, length), _ungrouped(lse, length).swapaxes(1, 2)


def _backward(q, k, v, segment_ids, kv_segment_ids, q_offset, out, lse, d_out, scale, block_q, block_kv):
    """FlashAttention-2 backward: outer loop over key blocks (carrying that block's dK, dV), inner over query blocks
    (dQ accumulated in one fp32 buffer of q's size)."""
    length, kv_length, kv_heads = q.shape[1], k.shape[1], k.shape[2]
    qg, dog = _grouped(q, kv_heads, block_q), _grouped(d_out, kv_heads, block_q)
    # D_t = Σ_p dO·O = Σ_s P·dP: the softmax Jacobian's row term.
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = _grouped(delta, kv_heads, block_q)                             # [B, K, G, T]
    lse_g = _grouped(lse.swapaxes(1, 2), kv_heads, block_q)                # [B, K, G, T]
    kt, vt = _kv_layout(k, block_kv), _kv_layout(v, block_kv)
    q_seg = _pad_to(segment_ids, 1, block_q, _PAD_Q_SEGMENT)
    kv_seg = _pad_to(kv_segment_ids, 1, block_kv, _PAD_KV_SEGMENT)
    q_blocks, kv_blocks = qg.shape[3] // block_q, kt.shape[2] // block_kv

    def one_kv_block(dq, j):
        start = j * block_kv
        k_blk = jax.lax.dynamic_slice_in_dim(kt, start, block_kv, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(vt, start, block_kv, axis=2)
        seg_blk = jax.lax.dynamic_slice_in_dim(kv_seg, start, block_kv, axis=1)
        kv_pos = start + jnp.arange(block_kv)

        def one_q_block(i, carry):
            dk, dv, dq = carry
            q_start = i * block_q
            rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=q_start, slice_size=block_q, axis=3)
            q_blk, do_blk = rows(qg), rows(dog)
            scores = _tile(q_blk, k_blk, jax.lax.dynamic_slice_in_dim(q_seg, q_start, block_q, axis=1), seg_blk,
                           q_offset + q_start + jnp.arange(block_q), kv_pos, scale)
            probs = jnp.exp(scores - rows(lse_g)[..., None])
            dv = dv + jnp.einsum("bkgts,bkgtd->bksd", probs.astype(d_out.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("bkgtd,bksd->bkgts", do_blk, v_blk, preferred_element_type=jnp.float32)
            d_scores = (probs * (d_probs - rows(delta)[..., None])) * scale
            dk = dk + jnp.einsum("bkgts,bkgtd->bksd", d_scores.astype(q.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            dq_blk = rows(dq) + jnp.einsum("bkgts,bksd->bkgtd", d_scores.astype(k.dtype), k_blk,
                                           preferred_element_type=jnp.float32)
            return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, q_start, axis=3)

        zeros = _zeros(k_blk.shape, k_blk, qg, dog, q_offset)
        first = _first_q_block(q_offset, j, block_q, block_kv, q_blocks)
        dk, dv, dq = jax.lax.fori_loop(first, q_blocks, one_q_block, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_kv_block, _zeros(qg.shape, qg, dog, kt, q_offset), jnp.arange(kv_blocks))

    def kv_grad(blocks, like):                                              # [n, B, K, bkv, P] → [B, S, K, P]
        full = jnp.moveaxis(blocks, 0, 2).reshape(kt.shape)
        return full.swapaxes(1, 2)[:, :kv_length].astype(like.dtype)

    return _ungrouped(dq, length).astype(q.dtype), kv_grad(dk, k), kv_grad(dv, v)
