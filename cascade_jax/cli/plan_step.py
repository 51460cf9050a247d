"""The work behind cascade-plan: abstract sharded train state → lowered, compiled train step → byte counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import Backends, NemotronH
from cascade_jax.ops import grouped_matmul as grouped_matmul_ops
from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context, tree_shardings
from cascade_jax.parallel.sharding import batch_sharding
from cascade_jax.train.config import OptimizerSection
from cascade_jax.train.metrics import train_flops_per_token
from cascade_jax.train.optimizer import build_optimizer
from cascade_jax.train.state import TrainState, split_model
from cascade_jax.train.step import StepSettings, train_step

STANDIN = "plan_standin"


def _standin_grouped_matmul(x, w, group_sizes, preferred_element_type):
    """Same FLOPs, buffers and weight gradients as a grouped matmul whose rows are spread evenly over
    the groups, without XLA:CPU's dense per-expert expansion of ragged_dot. Only for compiling plans:
    it ignores the actual grouping."""
    del group_sizes
    rows, groups = x.shape[0], w.shape[0]
    pad = -rows % groups
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(groups, (rows + pad) // groups, x.shape[1])
    y = jnp.einsum("gri,gio->gro", x, w, preferred_element_type=preferred_element_type)
    return y.reshape(rows + pad, -1)[:rows]


grouped_matmul_ops._BACKENDS.setdefault(STANDIN, _standin_grouped_matmul)


def _with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their sharding (shardings is a prefix tree: one per NNX Variable)."""
    return jax.tree.map(lambda sharding, sub: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), sub), shardings, abstract)


def _shard_bytes(abstract) -> int:
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_train_state(config: ModelConfig, mesh, *, dtype, remat, dispatch, tx, capacity_factor=None,
                         attention="xla"):
    """(graphdef, sharded abstract TrainState) — eval_shape only, nothing allocated."""
    backends = Backends(attention=attention, grouped_matmul=STANDIN, moe_dispatch=dispatch,
                        moe_capacity_factor=capacity_factor)
    model = nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                             param_dtype=jnp.float32, backends=backends, remat=remat))
    graphdef, params, expert_bias = split_model(model)
    state = jax.eval_shape(lambda p, b: TrainState(
        params=p, expert_bias=b, opt_state=tx.init(p), step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0))), params, expert_bias)
    return graphdef, _with_shardings(state, tree_shardings(state, mesh))


def plan_train_step(*, preset, mesh_sizes, seq_len, rows, micro_batches, remat, dtype, dispatch, loss_chunk,
                    capacity_factor=None, attention="xla"):
    config = ModelConfig.preset(preset)
    mesh = make_mesh(MeshConfig(**mesh_sizes))
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
    rows = rows or batch_shards
    tx = build_optimizer(OptimizerSection(), total_steps=1000)
    with mesh_context(mesh):
        graphdef, state = abstract_train_state(config, mesh, dtype=dtype, remat=remat, dispatch=dispatch, tx=tx,
                                               capacity_factor=capacity_factor, attention=attention)
        shape = (micro_batches, rows, seq_len)
        spec = batch_sharding(mesh, shape)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec)
                 for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        settings = StepSettings(loss_chunk_size=loss_chunk, bias_update_rate=1e-3)
        compiled = train_step.trace(state, batch, graphdef=graphdef, tx=tx, settings=settings).lower().compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = micro_batches * rows * seq_len
    total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes)
    return dict(
        preset=preset, mesh=dict(mesh.shape), devices=mesh.size, rows=rows, seq_len=seq_len,
        micro_batches=micro_batches, remat=remat, dtype=dtype, dispatch=dispatch, capacity_factor=capacity_factor,
        attention=attention,
        params=config.num_params(), active_params=config.num_active_params(),
        param_bytes=_shard_bytes((state.params, state.expert_bias)), opt_bytes=_shard_bytes(state.opt_state),
        argument_bytes=memory.argument_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes, total_bytes=total,
        flops_per_token=float(cost.get("flops", 0.0)) * mesh.size / tokens,
        six_n_active=6.0 * config.num_active_params(),
        attention_flops=train_flops_per_token(config, seq_len) - 6.0 * config.num_active_params(),
    )
