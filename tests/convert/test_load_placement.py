"""`load_pretrained(path, mesh=mesh)` without `partition` places parameters by the rules table, as training does."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import cascade_jax as cj
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context
from tools.convert_hf.to_jax import convert_to_jax

TOKENS = np.random.default_rng(0).integers(3, 512, (4, 24)).astype(np.int32)


def _logits(model):
    out = model(TOKENS)
    return np.asarray(getattr(out, "logits", out))


@pytest.mark.parametrize("source_kind", ["hf", "orbax"])
def test_default_placement_follows_the_rules(fixtures_dir, tmp_path, source_kind):
    assert len(jax.devices()) == 8
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    if source_kind == "orbax":
        convert_to_jax(source, tmp_path / "ckpt", progress=False)
        source = tmp_path / "ckpt"
    mesh = make_mesh(MeshConfig(fsdp=2, expert=4))
    model = cj.load_pretrained(source, mesh=mesh)
    moe, mamba = model.layers[1].mixer, model.layers[0].mixer
    # experts over `expert`, the hidden size of every matrix (and norm) over `fsdp`
    assert moe.up_proj[...].sharding.spec == P("expert", "fsdp", None)
    assert moe.down_proj[...].sharding.spec == P("expert", None, "fsdp")
    assert mamba.in_proj.kernel[...].sharding.spec == P("fsdp", None)
    assert {s.data.shape for s in moe.up_proj[...].addressable_shards} == {(2, 32, 32)}   # 8 experts, D=64
    assert mamba.A_log[...].sharding.spec == P(None)   # per-head: over `tensor`, absent here
    single = cj.load_pretrained(fixtures_dir / "hf" / "mamba_moe_attn")
    with mesh_context(mesh):
        sharded = _logits(model)
    np.testing.assert_allclose(sharded, _logits(single), rtol=0, atol=1e-5 * np.abs(_logits(single)).max())
    # every value is the one-device value; "replicated" is the explicit opt-out
    for (path, value), (_, expected) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(single))):
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(expected[...]), err_msg=str(path))
    whole = cj.load_pretrained(source, mesh=mesh, partition="replicated")
    assert whole.layers[1].mixer.up_proj[...].sharding.spec == P()
