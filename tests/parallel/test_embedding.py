"""The sharded embedding lookup equals `table[ids]` (values and table gradient) on every mesh layout it
meets, and a model step under fsdp × context compiles without XLA replicating the embedded rows."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from cascade_jax.model.embedding import IDS_AXES, TABLE_AXES, embed_lookup
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context
from cascade_jax.parallel.rules import logical_to_spec

VOCAB, HIDDEN = 64, 16


def _inputs(batch, length):
    keys = jax.random.split(jax.random.key(0), 3)
    table = jax.random.normal(keys[0], (VOCAB, HIDDEN))
    ids = jax.random.randint(keys[1], (batch, length), 0, VOCAB)
    cotangent = jax.random.normal(keys[2], (batch, length, HIDDEN))
    return table, ids, cotangent


def _loss(table, ids, cotangent):
    return jnp.sum(embed_lookup(table, ids, jnp.float32) * cotangent)


@pytest.mark.parametrize("axes, shape, sharded", [
    (dict(fsdp=2, context=4), (4, 32), True),
    (dict(fsdp=2, context=2, tensor=2), (4, 32), True),    # vocab-parallel rows too
    (dict(fsdp=4, expert=2), (8, 16), True),
    (dict(fsdp=2, context=4), (4, 1), False),   # one decoded token per row: context cannot split it (GSPMD path)
])
def test_sharded_lookup_equals_the_plain_one(axes, shape, sharded):
    table, ids, cotangent = _inputs(*shape)
    expected = jnp.take(table, ids, axis=0)
    expected_grad = jax.grad(_loss)(table, ids, cotangent)
    mesh = make_mesh(MeshConfig(**axes))
    with mesh_context(mesh):
        sizes = dict(mesh.shape)
        table_s = jax.device_put(table, NamedSharding(mesh, logical_to_spec(TABLE_AXES, table.shape, sizes)))
        ids_s = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(IDS_AXES, ids.shape, sizes)))
        out = jax.jit(embed_lookup, static_argnums=2)(table_s, ids_s, jnp.float32)
        grad = jax.jit(jax.grad(_loss))(table_s, ids_s, cotangent)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-6, atol=1e-6)
    if sharded:   # the gradient stays in the table's layout
        assert grad.sharding.spec == table_s.sharding.spec


_STEP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys
sys.path.insert(0, {repo!r})
from cascade_jax.train.config import load_sft_config
from cascade_jax.train.sft import run_sft
from tests.parallel.test_sft_mesh import RECIPE, SMALL
run_sft(load_sft_config(RECIPE, SMALL + [{mesh}, "run_dir=" + sys.argv[1], "train.steps=1"]))
"""


@pytest.mark.slow
def test_fsdp_context_step_does_not_replicate_activations(tmp_path):
    mesh = '"mesh.fsdp=2", "mesh.context=4", "model.backends.moe_dispatch=allgather"'
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    script = _STEP_SCRIPT.format(repo=repo, mesh=mesh)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1/1" in out.stdout + out.stderr
    assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]
