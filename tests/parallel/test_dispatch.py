"""Expert dispatch strategies on their own: equal to the one-program path, drops counted, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.model.moe import dropless_experts, route, routed_experts
from cascade_jax.model.nemotron_h import Backends
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context


def _problem(tokens=64, experts=8, top_k=2, dim=16, hidden=8):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (tokens, dim))
    up = jax.random.normal(k[1], (experts, dim, hidden)) / 4
    down = jax.random.normal(k[2], (experts, hidden, dim)) / 4
    logits = jax.random.normal(k[3], (tokens, experts)) + jnp.arange(experts) * 0.5   # skewed: overflow
    w, idx = route(logits, jnp.zeros(experts), top_k, 1, 1, 1.0, True)
    return x, w, idx, up, down


def _run(dispatch, mesh_cfg, capacity_factor=None, tokens=64):
    x, w, idx, up, down = _problem(tokens)
    with mesh_context(make_mesh(mesh_cfg)):
        return jax.jit(lambda *a: routed_experts(*a, dispatch=dispatch, capacity_factor=capacity_factor))(
            x, w, idx, up, down)


@pytest.mark.parametrize("dispatch", ["allgather", "all_to_all"])
def test_strategies_match_local(dispatch):
    x, w, idx, up, down = _problem(62)                 # 62 tokens: padded to the 8 token shards
    want = dropless_experts(x, w, idx, up, down)
    got, dropped = _run(dispatch, MeshConfig(expert=4, fsdp=2), tokens=62)
    assert int(dropped) == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_capacity_factor_drops_are_counted():
    x, w, idx, up, down = _problem()
    ep, shards, capacity_factor = 4, 8, 1.0
    got, dropped = _run("all_to_all", MeshConfig(expert=ep, fsdp=2), capacity_factor)
    # Expected: per token shard (8 tokens), assignments to each expert shard beyond ⌈1.0·8·2/4⌉ = 4.
    dest = np.asarray(idx).reshape(shards, -1) // (8 // ep)
    expected = sum(max(0, int((d == e).sum()) - 4) for d in dest for e in range(ep))
    assert expected > 0 and int(dropped) == expected
    kept_all = dropless_experts(x, w, idx, up, down)
    assert not np.allclose(got, kept_all)


def test_ragged_all_to_all_is_refused_on_cpu():
    with pytest.raises(ValueError, match="needs GPU or TPU"):
        _run("ragged_all_to_all", MeshConfig(expert=8))


def test_unknown_dispatch_and_missing_mesh():
    with pytest.raises(ValueError, match="moe_dispatch 'scatter'"):
        Backends(moe_dispatch="scatter")
    x, w, idx, up, down = _problem()
    with pytest.raises(ValueError, match="needs a mesh"):
        routed_experts(x, w, idx, up, down, dispatch="allgather")
