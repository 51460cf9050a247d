"""Sharded loading on 8 fake CPU devices, and export of a trainer's checkpoint."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cascade_jax as cj
from cascade_jax.weights.orbax_params import CONFIG_FILE
from tests.convert.helpers import assert_logits_match, read_all
from tools.convert_hf.to_hf import convert_to_hf
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


def test_trained_state_exports_to_hf(fixtures_dir, tmp_path):
    """A trainer's checkpoint: an Orbax tree with `params` beside optimizer state, config two levels up."""
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    convert_to_jax(source, tmp_path / "converted", progress=False)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tmp_path / "converted" / CONFIG_FILE, run / CONFIG_FILE)
    params = nnx.to_pure_dict(nnx.state(cj.load_pretrained(source)))
    params = jax.tree.map(np.asarray, _string_keys(params))
    state = {"params": params, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}, "step": np.int32(7)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(run / "7" / "state", state)
    convert_to_hf(run / "7", tmp_path / "hf", progress=False)
    assert read_all(tmp_path / "hf") == read_all(source)


def _string_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree
