"""TrainState: everything a step reads and writes, as one pytree (checkpointed as a whole)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cascade_jax.model.layers import ExpertBias
from cascade_jax.model.nemotron_h import NemotronH


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


def init_train_state(model: NemotronH, tx: optax.GradientTransformation, seed: int
                     ) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, expert_bias = split_model(model)
    state = TrainState(params=params, expert_bias=expert_bias, opt_state=tx.init(params),
                       step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, state
