"""Pure train and eval steps: (TrainState, batch) in, (TrainState, metrics) out.

A batch holds `micro_batches` slices ([A, B, T] arrays). Gradients are summed over the slices and
divided once by the number of loss tokens in the whole batch, so the loss is the token-level NLL of
the global batch whatever the accumulation.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cascade_jax.ops.cross_entropy import cross_entropy_sum
from cascade_jax.parallel.sharding import constrain_tree
from cascade_jax.train.balancing import load_imbalance, updated_expert_bias
from cascade_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSettings:
    loss_chunk_size: int = 512
    bias_update_rate: float = 0.0


def _sum_loss(params, expert_bias, graphdef, micro_batch, chunk_size):
    model = nnx.merge(graphdef, params, expert_bias)
    out = model(micro_batch["tokens"], segment_ids=micro_batch["segment_ids"], compute_logits=False)
    hidden = out.hidden_states.reshape(-1, out.hidden_states.shape[-1])
    total, count = cross_entropy_sum(hidden, model.output_kernel(), micro_batch["targets"].reshape(-1),
                                     micro_batch["loss_mask"].reshape(-1), chunk_size)
    return total, (count, out.expert_load, out.dropped_tokens)


def _scaled_loss(params, expert_bias, graphdef, micro_batch, chunk_size, scale):
    """The micro-batch's NLL sum times `scale` (1 / loss tokens of the whole batch), so its gradients need
    no division afterwards: dividing would hold a second copy of every gradient at the step's peak."""
    total, (_, load, dropped) = _sum_loss(params, expert_bias, graphdef, micro_batch, chunk_size)
    return total * scale, (total, load, dropped)


def _accumulate(state: TrainState, graphdef, batch, settings: StepSettings, scale):
    grad_fn = jax.value_and_grad(_scaled_loss, has_aux=True)

    def run(micro_batch):
        return grad_fn(state.params, state.expert_bias, graphdef, micro_batch, settings.loss_chunk_size, scale)

    def one(carry, micro_batch):
        grads, total, load, dropped = carry
        (_, (t, used, d)), g = run(micro_batch)
        return (jax.tree.map(jnp.add, grads, g), total + t, load + used, dropped + d), None

    # Rows of the expert-load metric: one per MoE layer (none for a dense pattern), read off the model.
    load_shape = jax.eval_shape(run, jax.tree.map(lambda x: x[0], batch))[0][1][1].shape
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            jnp.zeros(load_shape, jnp.int32), jnp.zeros((), jnp.int32))
    (grads, total, load, dropped), _ = jax.lax.scan(one, init, batch)
    return grads, total, load, dropped


def _rebalanced(expert_bias, load, rate):
    if rate == 0.0 or load.shape[0] == 0:
        return expert_bias
    # expert_load rows follow the MoE layers in depth order.
    layer_of = lambda path: next(k.key for k in path if isinstance(getattr(k, "key", None), int))  # noqa: E731
    layers = sorted(layer_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(expert_bias))
    row = {layer: i for i, layer in enumerate(layers)}
    return jax.tree_util.tree_map_with_path(
        lambda path, bias: updated_expert_bias(bias, load[row[layer_of(path)]], rate), expert_bias)


@partial(jax.jit, static_argnames=("graphdef", "tx", "settings"), donate_argnames=("state",))
def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               settings: StepSettings) -> tuple[TrainState, dict]:
    count = jnp.maximum(jnp.sum(batch["loss_mask"], dtype=jnp.float32), 1.0)
    grads, total, load, dropped = _accumulate(state, graphdef, batch, settings, 1.0 / count)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(params=params, expert_bias=_rebalanced(state.expert_bias, load, settings.bias_update_rate),
                           opt_state=opt_state, step=state.step + 1, rng=state.rng)
    new_state = constrain_tree(new_state)   # under a mesh: leave in the shardings we came in with
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "loss_tokens": count,
               "expert_imbalance": load_imbalance(load) if load.shape[0] else jnp.float32(1.0),
               "dropped_tokens": dropped}   # (token, expert) pairs past an all_to_all capacity; 0 when dropless
    return new_state, metrics


@partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def eval_loss_sums(params, expert_bias, batch: dict, *, graphdef, chunk_size: int = 512):
    """(Σ NLL, token count) of one [B, T] batch; sum these over an eval set and divide once."""
    total, (count, _, _) = _sum_loss(params, expert_bias, graphdef, batch, chunk_size)
    return total, count
