"""Sharded forward logits and parameter gradients equal the one-device result on 8 fake CPU devices."""

import functools

import jax
import numpy as np
import pytest

from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context, shard_batch, shard_tree
from tests.parallel.helpers import assert_close, batch, loss_fn, small_model, split

SLOW = pytest.mark.slow
# One case per required mesh runs by default (~1 min on 2 cores); every strategy on every mesh with -m slow.
CASES = [
    (dict(fsdp=8), "local"),
    pytest.param(dict(fsdp=8), "allgather", marks=SLOW),
    (dict(fsdp=2, expert=4), "all_to_all"),
    pytest.param(dict(fsdp=2, expert=4), "allgather", marks=SLOW),
    (dict(data=2, expert=2, tensor=2), "allgather"),
    pytest.param(dict(data=2, expert=2, tensor=2), "all_to_all", marks=SLOW),
    (dict(context=2, fsdp=4), "allgather"),   # documents cross the context split (model/context_parallel.py)
    pytest.param(dict(context=4, fsdp=2), "local", marks=SLOW),
]


def _value_and_grad(model, data):
    graphdef, params, rest = split(model)
    fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef), has_aux=True))
    return fn(params, rest, tokens=data["tokens"], segment_ids=data["segment_ids"])


@pytest.fixture(scope="module")
def reference():
    data = batch()
    (loss, (logits, _)), grads = _value_and_grad(small_model(), data)
    return data, loss, logits, grads


def _case_id(case):
    axes, dispatch = case.values if hasattr(case, "values") else case
    return f"{'-'.join(f'{k}{v}' for k, v in axes.items())}-{dispatch}"


@pytest.mark.parametrize("axes,dispatch", CASES, ids=[_case_id(c) for c in CASES])
def test_sharded_matches_single_device(reference, axes, dispatch):
    data, loss, logits, grads = reference
    mesh = make_mesh(MeshConfig(**axes))
    with mesh_context(mesh):
        model = small_model(dispatch)
        graphdef, params, rest = split(model)
        params, rest = shard_tree(params, mesh), shard_tree(rest, mesh)
        placed = shard_batch(data, mesh)
        fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef), has_aux=True))
        (got_loss, (got_logits, dropped)), got_grads = fn(params, rest, tokens=placed["tokens"],
                                                          segment_ids=placed["segment_ids"])
    assert int(dropped) == 0
    assert_close(got_logits, logits)
    assert_close(got_grads, grads)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    if axes.get("expert", 1) > 1:   # experts really are split over the expert axis
        up = params["layers"][1]["mixer"]["up_proj"]
        assert up.get_value().sharding.spec[0] == "expert"


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(data=2, context=2, tensor=2)], ids=["fsdp8", "dp2-cp2-tp2"])
def test_chunked_cross_entropy_sharded(axes):
    """Shard-aligned chunking under a mesh: loss and gradients equal the full-logits reference."""
    from jax.sharding import NamedSharding, PartitionSpec

    from cascade_jax.ops.cross_entropy import cross_entropy_reference, cross_entropy_sum, token_log_probs
    from cascade_jax.parallel.rules import logical_to_spec

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((8 * 12, 64)).astype(np.float32)
    kernel = (0.1 * rng.standard_normal((64, 256))).astype(np.float32)
    targets = rng.integers(0, 256, hidden.shape[0]).astype(np.int32)
    mask = (rng.random(hidden.shape[0]) < 0.8).astype(np.float32)
    grad = jax.value_and_grad(lambda h, k, f: f(h, k, targets, mask)[0], argnums=(0, 1))
    want = grad(hidden, kernel, cross_entropy_reference)
    mesh = make_mesh(MeshConfig(**axes))
    with mesh_context(mesh):
        tokens = NamedSharding(mesh, logical_to_spec(("tokens", None), hidden.shape, dict(mesh.shape)))
        placed = jax.device_put(hidden, tokens)
        fn = jax.jit(lambda h, k: grad(h, k, lambda *a: cross_entropy_sum(*a, chunk_size=5)))
        placed_kernel = jax.device_put(kernel, NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))
        got = fn(placed, placed_kernel)
        log_probs = jax.jit(lambda h, k: token_log_probs(h, k, targets, chunk_size=5))(placed, placed_kernel)
    assert_close(got, want)
    assert_close(log_probs, token_log_probs(hidden, kernel, targets))
