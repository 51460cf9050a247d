"""Mesh sizes from a config, the rules table covering every parameter, multi-host settings from env."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cascade_jax.parallel import RULES, MeshConfig, MeshConfigError, logical_to_spec, make_mesh
from cascade_jax.parallel.distributed import distributed_settings, first_slurm_host
from tests.parallel.helpers import small_model


def test_mesh_sizes_resolve_the_rest():
    assert MeshConfig(fsdp=-1, expert=2).sizes(8) == dict(data=1, fsdp=4, expert=2, context=1, tensor=1)
    assert dict(make_mesh(MeshConfig(data=2, expert=2, tensor=2)).shape) == dict(
        data=2, fsdp=1, expert=2, context=1, tensor=2)
    with pytest.raises(MeshConfigError, match="multiply to 4"):
        MeshConfig(fsdp=4).sizes(8)
    with pytest.raises(MeshConfigError, match="only one axis"):
        MeshConfig(fsdp=-1, data=-1).sizes(8)
    with pytest.raises(MeshConfigError, match="do not divide"):
        MeshConfig(fsdp=-1, expert=3).sizes(8)


def test_every_parameter_axis_has_a_rule():
    model = small_model()
    names = set()
    for _, v in nnx.to_flat_state(nnx.state(model)):
        names.update(n for n in v.get_metadata().get("logical_axes", ()) if n is not None)
    assert names <= set(RULES), names - set(RULES)


def test_specs_skip_unit_axes_and_indivisible_dims():
    shape = dict(data=2, fsdp=2, expert=2, context=1, tensor=1)
    assert logical_to_spec(("experts", "embed", "expert_mlp"), (8, 64, 32), shape) == P("expert", "fsdp", None)
    assert logical_to_spec(("batch", "length"), None, shape) == P(("data", "fsdp", "expert"), None)
    assert logical_to_spec(("batch", "length"), (2, 16), shape) == P("data", None)   # 2 rows: data only


def test_distributed_settings_from_env():
    assert distributed_settings({}) is None
    assert distributed_settings({"SLURM_NTASKS": "1"}) is None
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "gpu[07-10,12]"}
    assert distributed_settings(slurm) == dict(coordinator_address="gpu07:12355", num_processes=16, process_id=3)
    env = {"CASCADE_NUM_PROCESSES": "2", "CASCADE_PROCESS_ID": "1", "CASCADE_COORDINATOR": "10.0.0.1:99"}
    assert distributed_settings(env)["coordinator_address"] == "10.0.0.1:99"
    assert first_slurm_host("node1,node2") == "node1"
    with pytest.raises(ValueError, match="coordinator"):
        distributed_settings({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    assert jax.process_count() == 1
