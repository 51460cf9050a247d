"""Generation with a model sharded on a mesh (expert dispatch as in training) gives the one-device tokens,
and the cache stays sharded over the batch axes."""

import numpy as np
import pytest

import cascade_jax as cj
from cascade_jax.inference import Engine, SamplingParams, generate
from cascade_jax.model.cache import KVCache
from cascade_jax.model.nemotron_h import Backends
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context


@pytest.mark.parametrize("axes, dispatch", [
    (dict(fsdp=2, expert=2, tensor=2), "allgather"),
    pytest.param(dict(expert=4, fsdp=2), "all_to_all", marks=pytest.mark.slow),
    pytest.param(dict(data=2, fsdp=4), "local", marks=pytest.mark.slow),
])
def test_sharded_generation_matches_one_device(fixtures_dir, axes, dispatch):
    path = fixtures_dir / "hf" / "mamba_moe_attn"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, n).tolist() for n in (3, 9, 17, 2)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    expected = [c.tokens for c in generate(cj.load_pretrained(path), prompts, params)]
    mesh = make_mesh(MeshConfig(**axes))
    with mesh_context(mesh):
        model = cj.load_pretrained(path, mesh=mesh, backends=Backends(moe_dispatch=dispatch))
        engine = Engine(model, max_slots=4, max_len=40)
        assert [c.tokens for c in generate(model, prompts, params, engine=engine)] == expected
    kv = next(layer for layer in engine.cache.layers if isinstance(layer, KVCache))
    # 4 slots: over fsdp × expert when that divides them, else the major axis alone
    batch_axes = [a for a in ("data", "fsdp", "expert") if axes.get(a, 1) > 1]
    while np.prod([axes[a] for a in batch_axes]) > 4:   # 4 slots: the minor axes drop out until it divides
        batch_axes.pop()
    assert kv.k.sharding.spec[0] == (batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes))
