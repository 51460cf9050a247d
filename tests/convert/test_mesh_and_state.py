"""Sharded loading on 8 fake CPU devices."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cascade_jax as cj
from tests.convert.helpers import assert_logits_match
from tools.convert_hf.to_jax import convert_to_jax


def _split_largest_axis(path, variable):
    """Shard the first axis that 8 divides (experts, vocab, ...) over the mesh; replicate the rest."""
    for axis, size in enumerate(variable.shape):
        if size % 8 == 0:
            spec = [None] * len(variable.shape)
            spec[axis] = "x"
            return P(*spec)
    return None


def _flat_values(model):
    return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model))}


def test_mesh_loading_matches_single_device(fixtures_dir, tmp_path):
    assert len(jax.devices()) == 8
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    mesh = Mesh(np.array(jax.devices()), ("x",))
    single = _flat_values(cj.load_pretrained(source))
    convert_to_jax(source, tmp_path / "ckpt", progress=False)
    for path in (source, tmp_path / "ckpt"):
        sharded = _flat_values(cj.load_pretrained(path, mesh=mesh, partition=_split_largest_axis))
        assert sharded.keys() == single.keys()
        for key, value in sharded.items():
            expected_spec = _split_largest_axis(key, value) or P()
            assert value.sharding == NamedSharding(mesh, expected_spec), key
            np.testing.assert_array_equal(np.asarray(value), np.asarray(single[key]), err_msg=str(key))
    up = sharded[("layers", 1, "mixer", "up_proj")]
    assert {s.data.shape[0] for s in up.addressable_shards} == {1}   # 8 experts, one per device
    # a dict of specs works too; unnamed parameters are replicated
    model = cj.load_pretrained(source, mesh=mesh, partition={("layers", 1, "mixer", "up_proj"): P("x")})
    assert model.layers[1].mixer.up_proj[...].sharding.spec == P("x")
    assert model.layers[0].mixer.in_proj.kernel[...].sharding.spec == P()
    assert_logits_match(model, source)
