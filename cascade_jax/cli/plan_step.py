"""The work behind cascade-plan: run config → abstract sharded train state → compiled train step → byte counts.

Everything a run would build comes from its `SFTConfig` the way `cascade_jax.train.setup` builds it (model
section, optimizer, step settings, mesh), except the grouped matmul: XLA:CPU expands `ragged_dot` into a
dense matmul per expert, so the plan registers a stand-in with the FLOPs and buffers of a real one.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import REMAT_POLICIES, NemotronH
from cascade_jax.ops import grouped_matmul as grouped_matmul_ops
from cascade_jax.parallel import make_mesh, mesh_context, tree_shardings
from cascade_jax.parallel.rules import BATCH_AXES
from cascade_jax.parallel.sharding import batch_sharding
from cascade_jax.train.config import ModelSection, SFTConfig
from cascade_jax.train.metrics import train_flops_per_token
from cascade_jax.train.optimizer import build_optimizer
from cascade_jax.train.state import TrainState, split_model
from cascade_jax.train.step import NextTokenLoss, train_step
from cascade_jax.weights import orbax_params
from cascade_jax.weights.safetensors_dir import CheckpointError

STANDIN = "plan_standin"
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class PlanError(ValueError):
    """A run config the planner cannot compile (or a run could not start with); the message is one line."""


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


grouped_matmul_ops.register_backend(STANDIN, _standin_grouped_matmul)


def model_config_of(section: ModelSection) -> ModelConfig:
    """The ModelConfig a run with this model section trains, without reading any weights: from
    `from_pretrained` (an HF directory's config.json or a checkpoint's cascade_config.json) or the preset
    with `overrides` (as `train.setup.build_model` does)."""
    if section.from_pretrained:
        path = os.fspath(section.from_pretrained)
        try:
            if os.path.isfile(os.path.join(path, "config.json")):
                return ModelConfig.from_hf(path)
            return orbax_params.read_config(path)["model_config"]
        except (CheckpointError, ValueError, OSError) as e:
            raise PlanError(f"model.from_pretrained={path}: {_one_line(e)}") from None
    try:
        config = ModelConfig.preset(section.preset)
    except ValueError as e:
        raise PlanError(f"model.preset: {_one_line(e)}") from None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section.overrides) - fields)
    if unknown:
        raise PlanError(f"model.overrides.{unknown[0]}: not a ModelConfig field")
    try:
        return config.replace(**section.overrides)
    except (ValueError, TypeError) as e:
        raise PlanError(f"model.overrides: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_model_section(section: ModelSection) -> None:
    """Names a bad dtype, remat policy, grouped matmul backend or capacity factor before anything compiles."""
    for field in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(section, field))
        except TypeError:
            raise PlanError(f"model.{field}={getattr(section, field)!r}: not a dtype (e.g. bfloat16, float32)") from None
    if section.remat not in REMAT_POLICIES:
        raise PlanError(f"model.remat={section.remat!r}: expected one of {list(REMAT_POLICIES)}")
    names = [n for n in grouped_matmul_ops.backend_names() if n != STANDIN]
    if section.backends.grouped_matmul not in names:
        raise PlanError(f"model.backends.grouped_matmul={section.backends.grouped_matmul!r}: expected one of {names}")
    factor = section.backends.moe_capacity_factor
    if factor is not None and not factor > 0:
        raise PlanError(f"model.backends.moe_capacity_factor={factor}: expected a positive number (or null: dropless)")


def plan_model(config: ModelConfig, section: ModelSection, standin: bool = True) -> NemotronH:
    """The run's model (`train.setup.build_model`) as an abstract NNX module, with the stand-in grouped matmul
    unless `standin` is False (compilers with a real ragged grouped matmul)."""
    backends = dataclasses.replace(section.backends, grouped_matmul=STANDIN) if standin else section.backends
    return nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(section.dtype),
                                            param_dtype=jnp.dtype(section.param_dtype), backends=backends,
                                            remat=section.remat))


def _with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their sharding (shardings is a prefix tree: one per NNX Variable)."""
    return jax.tree.map(lambda sharding, sub: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), sub), shardings, abstract)


def _shard_bytes(abstract) -> int:
    """Bytes one device holds of an abstract tree (all of a leaf without a sharding)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        sharding = getattr(leaf, "sharding", None)
        shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_train_state(config: ModelConfig, section: ModelSection, mesh, tx, standin: bool = True):
    """(graphdef, abstract TrainState) — eval_shape only, nothing allocated; leaves carry their rule
    shardings under `mesh` (none without one: the run's one-device path)."""
    graphdef, params, expert_bias = split_model(plan_model(config, section, standin))
    state = jax.eval_shape(lambda p, b: TrainState(
        params=p, expert_bias=b, opt_state=tx.init(p), step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0))), params, expert_bias)
    if mesh is None:
        return graphdef, state
    return graphdef, _with_shardings(state, tree_shardings(state, mesh))


def batch_shape(run: SFTConfig, mesh_shape: dict[str, int], rows: int | None = None) -> tuple[int, int, int]:
    """[micro-batches, global rows, tokens] of the step's batch; PlanError when the mesh cannot split it
    the way `shard_batch` would. `rows` defaults to one per batch shard (data × fsdp × expert)."""
    batch_shards = math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)
    rows = rows or batch_shards
    if rows % batch_shards:
        raise PlanError(f"{rows} rows per micro-batch do not split over the {batch_shards} batch shards "
                        f"(mesh data×fsdp×expert); use a multiple of {batch_shards}")
    context = mesh_shape.get("context", 1)
    if run.data.max_len % context:
        raise PlanError(f"data.max_len={run.data.max_len} does not split over mesh.context={context}; "
                        f"use a multiple of {context}")
    return run.train.micro_batches, rows, run.data.max_len


def plan_train_step(run: SFTConfig, *, rows: int | None = None, model_config: ModelConfig | None = None,
                    name: str | None = None, devices: list | None = None) -> dict:
    """Compile the run's `train_step` for `devices` (default: the devices JAX has; fake CPU devices under
    cascade-plan, compile-only GPUs with --target gpu) and return its per-device memory and cost. `rows`:
    global rows per micro-batch (default: one per batch shard); each row holds `data.max_len` tokens,
    `train.micro_batches` micro-batches per step. XLA:CPU compiles a stand-in grouped matmul (see module)."""
    config = model_config or model_config_of(run.model)
    check_model_section(run.model)
    platform = (devices or jax.devices())[0].platform
    standin = platform == "cpu"
    mesh = None if run.mesh.is_single_device() else make_mesh(run.mesh, devices)
    mesh_shape = {} if mesh is None else dict(mesh.shape)
    shape = batch_shape(run, mesh_shape, rows)
    micro_batches, rows, seq_len = shape
    # What train.sft builds for the run: optimizer over the run's steps, the next-token loss, the bias rate.
    tx = build_optimizer(run.optimizer, run.train.steps)
    loss_fn = NextTokenLoss(run.train.loss_chunk_size)
    with mesh_context(mesh):
        graphdef, state = abstract_train_state(config, run.model, mesh, tx, standin)
        spec = None if mesh is None else batch_sharding(mesh, shape)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec) for k in BATCH_KEYS}
        compiled = train_step.trace(state, batch, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                                    bias_update_rate=run.moe.bias_update_rate).lower().compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    device_count = 1 if mesh is None else mesh.size
    # XLA's cost analysis counts a loop body once: the micro-batch scan's body is one micro-batch's work.
    tokens = rows * seq_len
    total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes)
    m = run.model
    return dict(
        name=name or m.from_pretrained or m.preset, mesh={a: s for a, s in mesh_shape.items() if s > 1} or {},
        devices=device_count, compiler=f"XLA:{platform.upper()}", rows=rows, seq_len=seq_len, micro_batches=micro_batches, remat=m.remat, dtype=m.dtype,
        param_dtype=m.param_dtype, dispatch=m.backends.moe_dispatch, capacity_factor=m.backends.moe_capacity_factor,
        attention=m.backends.attention, grouped_matmul=m.backends.grouped_matmul,
        loss_chunk=run.train.loss_chunk_size,
        params=config.num_params(), active_params=config.num_active_params(),
        param_bytes=_shard_bytes((state.params, state.expert_bias)), opt_bytes=_shard_bytes(state.opt_state),
        argument_bytes=memory.argument_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes, total_bytes=total,
        flops_per_token=float(cost.get("flops", 0.0)) * device_count / tokens,
        six_n_active=6.0 * config.num_active_params(),
        attention_flops=train_flops_per_token(config, seq_len) - 6.0 * config.num_active_params(),
    )
