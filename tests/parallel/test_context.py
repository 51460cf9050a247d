"""Context-parallel conv, SSD and attention equal the one-device ops, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from cascade_jax.model.context_parallel import context_size, sequence_attention, sequence_conv, sequence_ssd
from cascade_jax.ops.attention import attention
from cascade_jax.ops.conv import causal_conv1d
from cascade_jax.ops.ssd import ssd_chunked
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context
from cascade_jax.parallel.rules import logical_to_spec
from tests.parallel.helpers import assert_close

LENGTH = 48
MESHES = [dict(context=4, data=2), dict(context=2, tensor=2, fsdp=2)]


def _segments():
    """Row 0: one document; row 1: a document crossing rank boundaries, one starting exactly at token
    24 (a boundary for 2 and 4 ranks), then padding."""
    row1 = [1] * 17 + [2] * 7 + [3] * 18 + [0] * 6
    return jnp.array([[1] * LENGTH, row1], jnp.int32)


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 10)
    return dict(
        x=jax.random.normal(k[0], (2, LENGTH, 4, 8)),
        dt=jax.nn.softplus(jax.random.normal(k[1], (2, LENGTH, 4))),
        A=-jnp.exp(jax.random.normal(k[2], (4,))),
        B=jax.random.normal(k[3], (2, LENGTH, 2, 6)),
        C=jax.random.normal(k[4], (2, LENGTH, 2, 6)),
        conv_x=jax.random.normal(k[5], (2, LENGTH, 12)),
        conv_w=jax.random.normal(k[6], (4, 12)),
        conv_b=jax.random.normal(k[7], (12,)),
        k=jax.random.normal(k[8], (2, LENGTH, 2, 8)),
        v=jax.random.normal(k[9], (2, LENGTH, 2, 8)),
    )


def _place(tree, mesh):
    """Rows over the batch axes and tokens over context, as the model's activations arrive."""
    def put(a):
        if a.ndim < 2 or a.shape[1] != LENGTH:
            return a
        names = ("batch", "length") + (None,) * (a.ndim - 2)
        return jax.device_put(a, NamedSharding(mesh, logical_to_spec(names, a.shape, dict(mesh.shape))))
    return jax.tree.map(put, tree)


def _losses(fns):
    """Value and gradients of a random projection of each op's output."""
    def run(inputs, segments):
        conv, ssd, attn = fns
        i = inputs
        outs = (conv(i["conv_x"], i["conv_w"], i["conv_b"], segments),
                ssd(i["x"], i["dt"], i["A"], i["B"], i["C"], 8, segments),
                attn(i["x"], i["k"], i["v"], segments))
        return sum(jnp.sum(jnp.sin(jnp.arange(o.size).reshape(o.shape)) * o) for o in outs), outs
    return jax.jit(jax.value_and_grad(run, has_aux=True))


PLAIN = (lambda *a: causal_conv1d(*a)[0], lambda *a: ssd_chunked(*a)[0], lambda q, k, v, s: attention(q, k, v, s))
SHARDED = (sequence_conv, sequence_ssd, sequence_attention)


@pytest.mark.parametrize("axes", MESHES, ids=["cp4-dp2", "cp2-tp2-fsdp2"])
def test_context_parallel_ops_match_one_device(axes):
    inputs, segments = _inputs(), _segments()
    (_, want), want_grads = _losses(PLAIN)(inputs, segments)
    mesh = make_mesh(MeshConfig(**axes))
    with mesh_context(mesh):
        assert context_size(LENGTH) == axes["context"]
        (_, got), got_grads = _losses(SHARDED)(_place(inputs, mesh), _place(segments, mesh))
    assert_close(got, want)
    assert_close(got_grads, want_grads)


def test_no_mesh_is_the_plain_op():
    inputs, segments = _inputs(1), _segments()
    got = sequence_ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 8, segments)
    np.testing.assert_array_equal(got, ssd_chunked(inputs["x"], inputs["dt"], inputs["A"], inputs["B"],
                                                   inputs["C"], 8, segments)[0])


@pytest.mark.parametrize("backend", ["flash", "tokamax"])
def test_blockwise_attention_backends_under_context_parallelism(backend):
    inputs, segments = _inputs(2), _segments()
    qkv = dict(q=inputs["x"], k=inputs["k"], v=inputs["v"])

    def loss(a, s, **kw):
        out = sequence_attention(a["q"], a["k"], a["v"], s, **kw)
        return jnp.sum(jnp.sin(jnp.arange(out.size).reshape(out.shape)) * out)

    want = jax.value_and_grad(loss)(qkv, segments)
    mesh = make_mesh(MeshConfig(context=4, fsdp=2))
    with mesh_context(mesh):
        got = jax.jit(jax.value_and_grad(lambda a, s: loss(a, s, backend=backend, block_size=8)))(
            _place(qkv, mesh), _place(segments, mesh))
    assert_close(got, want)
