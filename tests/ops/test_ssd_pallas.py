"""ssd_pallas in Pallas interpret mode against the XLA references in ssd.py, values and gradients.

Tolerances are 1e-5 of the largest reference value (the scale-relative check test_ssd.py uses): the kernels
and ssd_chunked sum the same fp32 terms in different orders, nothing more."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from cascade_jax.ops import ssd
from cascade_jax.ops import ssd_pallas as sp
from cascade_jax.ops.ssd import ssd_chunked, ssd_reference
from tests.ops.test_ssd import _inputs as ssd_inputs

HEADS, HEAD_DIM, STATE = 4, 16, 16
_interpreted = functools.partial(sp.ssd_pallas, interpret=True)

# length, chunk, groups, document lengths per row (None: one document), with an initial state.
CASES = {
    "one_document": (64, 16, 2, None, False),
    # Row 0: documents start mid-chunk (5, 52) and exactly at chunk boundaries (16, 32);
    # row 1: at a boundary (32), then a 3-token document inside a chunk.
    "packed": (64, 16, 2, [[5, 11, 16, 20, 12], [32, 3, 29]], True),
    "ragged_length_one_group": (40, 16, 1, [[13, 27], [40]], True),
    "group_per_head": (72, 32, 4, [[20, 44, 8], [72]], True),
}


def _inputs(key, length, groups, batch=2, heads=HEADS):
    return ssd_inputs(key, batch, length, heads, HEAD_DIM, groups, STATE)


def _segments(rows, length):
    if rows is None:
        return jnp.zeros((2, length), jnp.int32)
    return jnp.array([sum(([i + 1] * n for i, n in enumerate(lengths)), []) for lengths in rows], jnp.int32)


def _case(name):
    length, chunk, groups, rows, with_state = CASES[name]
    x, dt, A, B, C, s0 = _inputs(jax.random.key(length), length, groups)
    return (x, dt, A, B, C, s0 if with_state else None), chunk, _segments(rows, length)


def _assert_close(actual, expected, rtol=1e-5):
    scale = float(jnp.max(jnp.abs(expected)))
    error = float(jnp.max(jnp.abs(actual - expected)))
    assert error <= rtol * scale, f"max error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("name", CASES)
def test_values_match_references(name):
    (x, dt, A, B, C, s0), chunk, seg = _case(name)
    y, final = jax.jit(lambda *a: _interpreted(*a[:5], chunk, seg, a[5]))(x, dt, A, B, C, s0)
    chex.assert_shape(y, x.shape)
    chex.assert_shape(final, (2, HEADS, HEAD_DIM, STATE))
    chex.assert_type([y, final], jnp.float32)
    for reference in (ssd_reference(x, dt, A, B, C, seg, s0), ssd_chunked(x, dt, A, B, C, chunk, seg, s0)):
        _assert_close(y, reference[0])
        _assert_close(final, reference[1])


def test_bf16_inputs_are_computed_in_fp32():
    (x, dt, A, B, C, s0), chunk, seg = _case("packed")
    x, B, C, s0 = (a.astype(jnp.bfloat16) for a in (x, B, C, s0))
    y, final = sp.ssd_pallas(x, dt, A, B, C, chunk, seg, s0)          # default: interpret mode off a GPU
    y_ref, final_ref = ssd_chunked(x, dt, A, B, C, chunk, seg, s0)
    chex.assert_type([y, final], jnp.float32)
    _assert_close(y, y_ref)
    _assert_close(final, final_ref)


def test_long_decays_stay_accurate():
    """Large Δ on each chunk's first tokens, small after: later tokens mix over O(1) decays while |cum|
    is already in the thousands, where differencing plain fp32 cumulative sums is off by ~1e-4."""
    x, dt, A, B, C, _ = _inputs(jax.random.key(5), 128, 1, batch=1, heads=2)
    dt = jnp.where((jnp.arange(128) % 64 < 8)[None, :, None], 50.0, 0.05)
    y, final = _interpreted(x, dt, A, B, C, 64)
    y_ref, final_ref = ssd_reference(x, dt, A, B, C)
    _assert_close(y, y_ref)
    _assert_close(final, final_ref)


def _vjp(fn, args, chunk, seg, key):
    """Gradients of ⟨y, r_y⟩ + ⟨final, r_s⟩ for random r, w.r.t. all float inputs present."""
    primals = tuple(a for a in args if a is not None)
    with_state = args[5] is not None

    def call(*a):
        return fn(*a[:5], chunk, seg, a[5] if with_state else None)

    out, pullback = jax.vjp(call, *primals)
    k_y, k_s = jax.random.split(key)
    return pullback((jax.random.normal(k_y, out[0].shape, out[0].dtype),
                     jax.random.normal(k_s, out[1].shape, out[1].dtype)))


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_chunked(name):
    args, chunk, seg = _case(name)
    grads = jax.jit(lambda *a: _vjp(_interpreted, a, chunk, seg, jax.random.key(7)))(*args)
    expected = _vjp(ssd_chunked, args, chunk, seg, jax.random.key(7))
    assert len(grads) == (6 if args[5] is not None else 5)
    for g, g_ref in zip(grads, expected):
        assert bool(jnp.all(jnp.isfinite(g)))
        _assert_close(g, g_ref)


def test_bf16_gradients():
    """Gradients come back in the inputs' dtypes. Both sides compute them in fp32 and round to bf16, so
    they differ by at most one bf16 rounding step (2⁻⁸ relative), not by 1e-5."""
    (x, dt, A, B, C, s0), chunk, seg = _case("packed")
    args = (x.astype(jnp.bfloat16), dt, A, B.astype(jnp.bfloat16), C.astype(jnp.bfloat16), s0)
    grads = _vjp(_interpreted, args, chunk, seg, jax.random.key(9))
    expected = _vjp(ssd_chunked, args, chunk, seg, jax.random.key(9))
    chex.assert_type(grads, [a.dtype for a in args])
    for g, g_ref in zip(grads, expected):
        _assert_close(g.astype(jnp.float32), g_ref.astype(jnp.float32), rtol=2**-8)


def test_gradients_with_sequential_state_passing(monkeypatch):
    """Past ssd._MAX_MATRIX_CHUNKS, states pass through a scan; the kernels' gradients must not care."""
    monkeypatch.setattr(ssd, "_MAX_MATRIX_CHUNKS", 0)
    args, chunk, seg = _case("packed")
    grads = _vjp(_interpreted, args, chunk, seg, jax.random.key(8))
    for g, g_ref in zip(grads, _vjp(ssd_chunked, args, chunk, seg, jax.random.key(8))):
        _assert_close(g, g_ref)


# ----------------------------------------------------------------------------------------------------------
# Each kernel's custom_vjp against jax.vjp of a plain-jnp version of the same chunk-local function, so a
# wrong backward kernel shows up here and not only in the end-to-end gradients.

CHUNK, LENGTH, GROUPS = 16, 64, 2
_INTERPRET = sp.KernelOptions(interpret=True)


def _kernel_inputs(key):
    """Kernel layout: x [B,T,H,P], dt and log_decay [B,H,T], B/C [B,T,G,N], int masks, states [B,c,H,P,N]."""
    x, dt, A, B, C, _ = _inputs(key, LENGTH, GROUPS)
    dt = jnp.moveaxis(dt, 1, 2)
    seg = _segments(CASES["packed"][3], LENGTH)
    chunked_seg = seg.reshape(2, -1, CHUNK)
    in_last = (chunked_seg == chunked_seg[..., -1:]).reshape(2, LENGTH).astype(jnp.int32)
    incoming = (chunked_seg == chunked_seg[..., :1]).reshape(2, LENGTH).astype(jnp.int32)
    states = jax.random.normal(jax.random.fold_in(key, 1), (2, LENGTH // CHUNK, HEADS, HEAD_DIM, STATE))
    return dict(x=x, dt=dt, log_decay=dt * A[:, None], B=B, C=C, seg=seg, in_last=in_last,
                incoming=incoming, states=states)


def _per_chunk(a):
    """[B, H, T] → [B, H, c, L]."""
    return a.reshape(a.shape[:2] + (-1, CHUNK))


def _token_chunks(a):
    """[B, T, ...] → [B, c, L, ...], heads broadcast from groups for B and C."""
    if a.shape[2] != HEADS:
        a = jnp.repeat(a, HEADS // a.shape[2], axis=2)
    return a.reshape((a.shape[0], -1, CHUNK) + a.shape[2:])


def _decays(log_decay, seg):
    """Decays summed term by term (ssd._segment_sum), independent of the kernels' compensated cumsum."""
    sums = ssd._segment_sum(_per_chunk(log_decay))                            # [B, H, c, L, L]
    same_doc = _per_chunk(seg[:, None])[..., :, None] == _per_chunk(seg[:, None])[..., None, :]
    return jnp.exp(jnp.where(same_doc, sums, -jnp.inf)), sums[..., -1, :]


def _chunk_state_jnp(x, dt, log_decay, B, in_last):
    _, to_end = _decays(log_decay, jnp.zeros(x.shape[:2], jnp.int32))
    weight = jnp.exp(jnp.where(_per_chunk(in_last[:, None]) != 0, to_end, -jnp.inf)) * _per_chunk(dt)
    return jnp.einsum("bhcj,bcjhp,bcjhn->bchpn", weight, _token_chunks(x), _token_chunks(B))


def _chunk_scan_jnp(x, dt, log_decay, B, C, seg, incoming, states):
    decay, _ = _decays(log_decay, seg)
    C_c = _token_chunks(C)
    scores = jnp.einsum("bcihn,bcjhn->bhcij", C_c, _token_chunks(B))
    x_dt = _token_chunks(x) * jnp.moveaxis(_per_chunk(dt), 1, 3)[..., None]
    y = jnp.einsum("bhcij,bcjhp->bcihp", decay * scores, x_dt)
    cum = jnp.cumsum(_per_chunk(log_decay), axis=-1)
    from_start = jnp.exp(jnp.where(_per_chunk(incoming[:, None]) != 0, cum, -jnp.inf))
    y = y + jnp.einsum("bcihn,bchpn,bhci->bcihp", C_c, states, from_start)
    return y.reshape(x.shape)


def _assert_same_vjp(kernel, reference, primals, key):
    out, pullback = jax.vjp(kernel, *primals)
    out_ref, pullback_ref = jax.vjp(reference, *primals)
    _assert_close(out, out_ref)
    cotangent = jax.random.normal(key, out.shape)
    for g, g_ref in zip(pullback(cotangent), pullback_ref(cotangent)):
        _assert_close(g, g_ref)


def test_chunk_state_kernel_vjp():
    i = _kernel_inputs(jax.random.key(10))
    _assert_same_vjp(lambda *a: sp._chunk_state(*a, i["in_last"], CHUNK, _INTERPRET),
                     lambda *a: _chunk_state_jnp(*a, i["in_last"]),
                     (i["x"], i["dt"], i["log_decay"], i["B"]), jax.random.key(11))


def test_chunk_scan_kernel_vjp():
    i = _kernel_inputs(jax.random.key(12))
    masks = (i["seg"], i["incoming"])

    def kernel(x, dt, log_decay, B, C, states):
        return sp._chunk_scan(x, dt, log_decay, B, C, *masks, states, CHUNK, _INTERPRET)

    def reference(x, dt, log_decay, B, C, states):
        return _chunk_scan_jnp(x, dt, log_decay, B, C, *masks, states)

    _assert_same_vjp(kernel, reference, tuple(i[k] for k in ("x", "dt", "log_decay", "B", "C", "states")),
                     jax.random.key(13))


def test_rejects_sizes_triton_cannot_tile():
    x, dt, A, B, C, _ = _inputs(jax.random.key(0), 40, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        _interpreted(x, dt, A, B, C, 24)


# ----------------------------------------------------------------------------------------------------------
# GPU tuning knobs. Interpret mode runs every dot at HIGHEST (XLA:CPU has no TF32 algorithms), so here they
# must change nothing; what they lower to for a GPU is checked on the CUDA lowering below.

def test_tuning_knobs_do_not_change_interpreted_results():
    args, chunk, seg = _case("packed")

    def run(**knobs):
        fn = functools.partial(_interpreted, **knobs)
        return jax.jit(lambda *a: (fn(*a[:5], chunk, seg, a[5]), _vjp(fn, a, chunk, seg, jax.random.key(3))))(*args)

    expected = run()
    for knobs in (dict(dot_precision="tf32x3", num_warps=8), dict(dot_precision="tf32", num_warps=2)):
        chex.assert_trees_all_equal(run(**knobs), expected)


@pytest.mark.parametrize("knobs, match", [(dict(dot_precision="bf16"), "dot_precision"),
                                          (dict(num_warps=3), "num_warps"), (dict(num_warps=64), "num_warps")])
def test_rejects_unknown_tuning_knobs(knobs, match):
    x, dt, A, B, C, _ = _inputs(jax.random.key(0), 32, 2)
    with pytest.raises(ValueError, match=match):
        _interpreted(x, dt, A, B, C, 16, **knobs)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_knobs_reach_the_cuda_lowering(monkeypatch):
    """Lowers forward and gradient for an H200 (an abstract device: no GPU needed) at the model's shape,
    and reads the Triton modules: every tt.dot carries the chosen input precision, every kernel call the
    chosen warps. Catches a knob that is silently dropped, not whether Triton compiles or how fast it runs."""
    from jax._src.pallas.triton import pallas_call_registration as registration  # private: may move

    to_triton = getattr(getattr(registration, "lowering", None), "lower_jaxpr_to_triton_module", None)
    if to_triton is None:
        pytest.skip("jax's Pallas Triton lowering no longer exposes lower_jaxpr_to_triton_module")
    modules = []

    def recording(*a, **k):
        result = to_triton(*a, **k)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", recording)
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h200)
    batch, length, heads, head_dim, groups, state = 1, 256, 64, 64, 8, 128
    shapes = [(batch, length, heads, head_dim), (batch, length, heads), (heads,), (batch, length, groups, state),
              (batch, length, groups, state)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

    def lower(fn):
        modules.clear()
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return text, [line for m in modules for line in m.splitlines() if "tt.dot " in line]

    texts = {}
    for precision, warps in (("highest", None), ("tf32x3", 8), ("tf32", 8)):
        forward = functools.partial(sp.ssd_pallas, chunk_size=128, interpret=False, dot_precision=precision,
                                    num_warps=warps)
        # Squared: with a linear loss the forward chunk_scan's output would be dead code, and not lowered.
        loss = lambda *a: sum(jnp.sum(out**2) for out in forward(*a))  # noqa: E731
        for kind, fn, kernels, dots in (("forward", forward, 2, 4), ("grad", jax.grad(loss, range(5)), 4, 14)):
            text, dot_lines = lower(fn)
            texts[precision, kind] = text
            assert text.count("__gpu$xla.gpu.triton") == kernels
            assert text.count(f"num_warps = {warps or 4} : i32") == kernels
            assert len(dot_lines) == dots
            if precision == "highest":                                # IEEE: Triton's default, not printed
                assert not any("tf32" in line for line in dot_lines), dot_lines[0]
            else:
                assert all(f"inputPrecision = {precision} " in line for line in dot_lines), dot_lines[0]
    assert len({texts[precision, "forward"] for precision in ("highest", "tf32x3", "tf32")}) == 3
