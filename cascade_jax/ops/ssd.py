"""Mamba-2 state-space scan: the chunked SSD algorithm and its per-token reference.

Recurrence per head h (state S ∈ R^{P×N}, fp32, reset to 0 at every document start):
    S[t] = exp(Δ[t]·A) · S[t-1] + Δ[t] · x[t] ⊗ B[t]
    y[t] = S[t] · C[t]
The chunked form is an exact re-association: inside a chunk of C tokens the output is a masked,
decay-weighted "attention" C·Bᵀ over the chunk; across chunks only the [P, N] states are passed on.
Working memory is O(T·C) per head for the intra-chunk matrices plus one state per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG_INF = -jnp.inf


def _broadcast_groups(bc: Float[Array, "B T G N"], num_heads: int) -> Float[Array, "B T H N"]:
    """Head h reads B/C group h // (H / G)."""
    return jnp.repeat(bc, num_heads // bc.shape[2], axis=2)


def _document_starts(segment_ids: Int[Array, "B T"]) -> Array:
    """True where a token starts a new document (its segment differs from the previous token's)."""
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != previous


def ssd_reference(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    A: Float[Array, "H"],
    B: Float[Array, "B T G N"],
    C: Float[Array, "B T G N"],
    segment_ids: Int[Array, "B T"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
    """Per-token recurrence (slow, obviously right). `dt` is Δ after softplus; `A` is negative."""
    batch, _, heads, head_dim = x.shape
    f32 = jnp.float32
    x, dt, A = x.astype(f32), dt.astype(f32), A.astype(f32)
    B, C = _broadcast_groups(B.astype(f32), heads), _broadcast_groups(C.astype(f32), heads)
    if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
    keep = ~_document_starts(segment_ids)
    state = jnp.zeros((batch, heads, head_dim, B.shape[-1]), f32) if initial_state is None else initial_state
    state = state.astype(f32)

    def step(state, inputs):
        x_t, dt_t, b_t, c_t, keep_t = inputs
        decay = jnp.exp(dt_t * A) * keep_t[:, None]
        state = decay[..., None, None] * state + jnp.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, b_t)
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C, keep)]
    state, y = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(y, 0, 1), state


def _segment_sum(log_decay: Float[Array, "... C"]) -> Float[Array, "... C C"]:
    """out[i, j] = Σ_{k=j+1..i} log_decay[k] for j ≤ i, −inf above the diagonal.

    Summing the masked terms directly (rather than differencing a cumulative sum) keeps full fp32
    precision where the decays are long.
    """
    size = log_decay.shape[-1]
    tiled = jnp.broadcast_to(log_decay[..., :, None], log_decay.shape + (size,))
    strictly_lower = jnp.tril(jnp.ones((size, size), bool), -1)
    sums = jnp.cumsum(jnp.where(strictly_lower, tiled, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), sums, _NEG_INF)


# Up to this many chunks, states pass between chunks as one [c+1, c+1] decay-matrix product (no loop; its
# cost, c² per head state, stays small next to the layer); beyond, a sequential scan over chunks.
_MAX_MATRIX_CHUNKS = 512


def _pass_states_matrix(log_carry, chunk_states, state0):
    """state entering chunk z = Σ_{c<z} (Π_{c<k<z} carry_k) · own_c + (Π_{k<z} carry_k) · state0.

    A loop here would also do, but XLA allocates a loop's stacked outputs up front, and schedulers have
    been seen creating those buffers for every layer at the start of the step."""
    states = jnp.concatenate([state0[:, None], chunk_states], axis=1)           # [B, c+1, H, P, N]
    log_steps = jnp.pad(jnp.moveaxis(log_carry, 1, 2), ((0, 0), (0, 0), (1, 0)))  # [B, H, c+1]
    decay = jnp.exp(_segment_sum(log_steps))                                    # [B, H, c+1, c+1]
    passed = jnp.einsum("bhzc,bchpn->bzhpn", decay, states)
    return passed[:, :-1], passed[:, -1]


def _pass_states_scan(log_carry, chunk_states, state0):
    """The same recurrence, one chunk at a time: S ← carry_c · S + own_c."""
    def step(carry, inputs):
        log_decay, own = inputs
        return jnp.exp(log_decay)[..., None, None] * carry + own, carry

    final, before = jax.lax.scan(step, state0, (jnp.moveaxis(log_carry, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    return jnp.moveaxis(before, 0, 1), final


def pad_to_chunks(token_arrays, segment_ids, chunk_size: int):
    """Pad [B, T, ...] arrays to whole chunks with zeros (Δ = 0: decay 1, no input) in the last token's
    segment, so the state passes through the padding unchanged."""
    pad = -segment_ids.shape[1] % chunk_size
    if not pad:
        return tuple(token_arrays), segment_ids
    padded = tuple(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in token_arrays)
    tail = jnp.broadcast_to(segment_ids[:, -1:], (segment_ids.shape[0], pad))
    return padded, jnp.concatenate([segment_ids, tail], axis=1)


def ssd_chunked(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    A: Float[Array, "H"],
    B: Float[Array, "B T G N"],
    C: Float[Array, "B T G N"],
    chunk_size: int,
    segment_ids: Int[Array, "B T"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
    """Chunked SSD scan in fp32; same contract as `ssd_reference`.

    `initial_state` belongs to the row's first document; the state resets at every later document start.
    The final state is the state after the last token.
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    f32 = jnp.float32
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    (x, dt, B, C), segment_ids = pad_to_chunks((x, dt, B, C), segment_ids, chunk_size)
    chunks = segment_ids.shape[1] // chunk_size

    def to_chunks(a):
        return a.reshape((batch, chunks, chunk_size) + a.shape[2:]).astype(f32)

    x, dt, B, C = to_chunks(x), to_chunks(dt), to_chunks(B), to_chunks(C)
    seg = segment_ids.reshape(batch, chunks, chunk_size)
    heads_per_group = heads // groups
    log_decay = jnp.moveaxis(dt * A.astype(f32), -1, 2)                       # [B, c, H, C]
    cum_decay = jnp.cumsum(log_decay, axis=-1)                               # [B, c, H, C]
    x_dt = x * dt[..., None]                                                 # [B, c, C, H, P]

    # 1. Intra-chunk: y[i] = Σ_{j≤i, same doc} C_i·B_j · exp(Σ_{j<k≤i} log a_k) · Δ_j x_j.
    segment_sums = _segment_sum(log_decay)                                   # [B, c, H, C, C]
    same_doc = seg[..., :, None] == seg[..., None, :]                        # [B, c, C, C]
    decay_matrix = jnp.exp(jnp.where(same_doc[:, :, None], segment_sums, _NEG_INF))
    scores = jnp.einsum("bcign,bcjgn->bcgij", C, B)                          # [B, c, G, C, C]
    scores = jnp.repeat(scores, heads_per_group, axis=2) * decay_matrix      # [B, c, H, C, C]
    y = jnp.einsum("bchij,bcjhp->bcihp", scores, x_dt)

    # 2. Each chunk's own contribution to the state at its last token.
    last_seg = seg[..., -1:]                                                 # [B, c, 1]
    decay_to_end = jnp.exp(jnp.where((seg == last_seg)[:, :, None],
                                     segment_sums[..., -1, :], _NEG_INF))     # [B, c, H, C]
    B_heads = jnp.repeat(B, heads_per_group, axis=3)                         # [B, c, C, H, N]
    chunk_states = jnp.einsum("bchj,bcjhp,bcjhn->bchpn", decay_to_end, x_dt, B_heads)

    # 3. Pass states across chunks; the carry survives a chunk only if no document starts inside it.
    prev_last_seg = jnp.concatenate([seg[:, :1, :1], last_seg[:, :-1]], axis=1)  # [B, c, 1]
    log_carry = jnp.where(last_seg == prev_last_seg, cum_decay[..., -1], _NEG_INF)  # [B, c, H]
    state0 = jnp.zeros_like(chunk_states[:, 0]) if initial_state is None else initial_state.astype(f32)
    pass_states = _pass_states_matrix if chunks <= _MAX_MATRIX_CHUNKS else _pass_states_scan
    states_before, final_state = pass_states(log_carry, chunk_states, state0)  # [B, c, H, P, N], [B, H, P, N]

    # 4. Contribution of the incoming state to each token still in the incoming document.
    decay_from_start = jnp.exp(jnp.where((seg == prev_last_seg)[:, :, None], cum_decay, _NEG_INF))
    C_heads = jnp.repeat(C, heads_per_group, axis=3)                         # [B, c, C, H, N]
    y = y + jnp.einsum("bcihn,bchpn,bchi->bcihp", C_heads, states_before, decay_from_start)

    y = y.reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y, final_state


def ssd_step(
    x: Float[Array, "B H P"],
    dt: Float[Array, "B H"],
    A: Float[Array, "H"],
    B: Float[Array, "B G N"],
    C: Float[Array, "B G N"],
    state: Float[Array, "B H P N"],
) -> tuple[Float[Array, "B H P"], Float[Array, "B H P N"]]:
    """One token of the recurrence (decoding): S ← exp(Δ·A)·S + Δ·x⊗B, y = S·C; fp32 throughout, so a
    decoded token sees the same state the chunked scan would have carried."""
    f32 = jnp.float32
    heads = x.shape[1]
    x, dt, A = x.astype(f32), dt.astype(f32), A.astype(f32)
    B = _broadcast_groups(B[:, None].astype(f32), heads)[:, 0]
    C = _broadcast_groups(C[:, None].astype(f32), heads)[:, 0]
    decay = jnp.exp(dt * A)                                                   # [B, H]
    state = decay[..., None, None] * state.astype(f32) + jnp.einsum("bh,bhp,bhn->bhpn", dt, x, B)
    return jnp.einsum("bhpn,bhn->bhp", state, C), state

