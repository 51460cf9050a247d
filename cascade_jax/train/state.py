"""TrainState: everything a step reads and writes, as one pytree (checkpointed as a whole)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cascade_jax.model.layers import ExpertBias
from cascade_jax.model.nemotron_h import NemotronH
from cascade_jax.parallel.sharding import init_sharded, tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State          # trainable parameters (fp32 master weights)
    expert_bias: nnx.State     # router correction biases, updated by load balancing, not by gradients
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def split_model(model: NemotronH) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, expert_bias = nnx.split(model, nnx.Param, ExpertBias)
    return graphdef, params, expert_bias


def _state_from(params, expert_bias, tx, seed) -> TrainState:
    return TrainState(params=params, expert_bias=expert_bias, opt_state=tx.init(params),
                      step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)))


def init_train_state(model: NemotronH, tx: optax.GradientTransformation, seed: int
                     ) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, expert_bias = split_model(model)
    return graphdef, _state_from(params, expert_bias, tx, seed)


def init_sharded_train_state(build: Callable[[], NemotronH], tx: optax.GradientTransformation, seed: int,
                             mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """Build the model and optimizer state inside one jit whose outputs are already sharded by the
    logical-axis rules: no device ever holds the whole model."""
    graphdef = split_model(nnx.eval_shape(build))[0]
    return graphdef, init_sharded(lambda: init_train_state(build(), tx, seed)[1], mesh)


def shard_train_state(model: NemotronH, tx: optax.GradientTransformation, seed: int,
                      mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """A built (e.g. loaded) model → sharded TrainState; its arrays go in as arguments, not constants."""
    graphdef, params, expert_bias = split_model(model)
    abstract = jax.eval_shape(lambda p, b: _state_from(p, b, tx, seed), params, expert_bias)
    make = jax.jit(lambda p, b: _state_from(p, b, tx, seed), out_shardings=tree_shardings(abstract, mesh))
    return graphdef, make(params, expert_bias)
