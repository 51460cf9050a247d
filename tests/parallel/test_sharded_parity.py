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
