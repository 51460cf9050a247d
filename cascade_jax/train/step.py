"""Pure train and eval steps: (TrainState, batch) in, (TrainState, metrics) out, for any loss.

A loss is a hashable callable `loss_fn(model, micro_batch) -> (sum, (count, aux))`: the sum of a per-token
loss over the micro-batch's loss tokens, their count, and a dict of arrays that add up over micro-batches
(`expert_load` [L_moe, E] drives the router-bias balancing; `dropped_tokens` and anything else is
reported as summed). A batch holds `micro_batches` slices ([A, B, T] arrays) and a `loss_mask`. Before
differentiating, each micro-batch's sum is scaled by 1 / (loss tokens of the whole batch), so the step
optimizes the token-level mean over the global batch whatever the accumulation.
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
class NextTokenLoss:
    """SFT: Σ NLL of `targets` where `loss_mask`, by the chunked cross-entropy (no [tokens, V] logits)."""

    chunk_size: int = 512

    def __call__(self, model, micro_batch):
        out = model(micro_batch["tokens"], segment_ids=micro_batch["segment_ids"], compute_logits=False)
        hidden = out.hidden_states.reshape(-1, out.hidden_states.shape[-1])
        total, count = cross_entropy_sum(hidden, model.output_kernel(), micro_batch["targets"].reshape(-1),
                                         micro_batch["loss_mask"].reshape(-1), self.chunk_size)
        dropped = jnp.zeros((), jnp.int32) if out.dropped_tokens is None else out.dropped_tokens
        return total, (count, {"expert_load": out.expert_load, "dropped_tokens": dropped})


def _scaled_loss(params, expert_bias, graphdef, loss_fn, micro_batch, scale):
    """The micro-batch's loss sum times `scale` (1 / loss tokens of the whole batch), so its gradients need
    no division afterwards: dividing would hold a second copy of every gradient at the step's peak."""
    total, (_, aux) = loss_fn(nnx.merge(graphdef, params, expert_bias), micro_batch)
    return total * scale, (total, aux)


def _accumulate(state: TrainState, graphdef, loss_fn, batch, scale):
    grad_fn = jax.value_and_grad(_scaled_loss, has_aux=True)

    def run(micro_batch):
        return grad_fn(state.params, state.expert_bias, graphdef, loss_fn, micro_batch, scale)

    def one(carry, micro_batch):
        grads, total, aux = carry
        (_, (t, a)), g = run(micro_batch)
        return (jax.tree.map(jnp.add, grads, g), total + t, jax.tree.map(jnp.add, aux, a)), None

    # The aux shapes (e.g. one expert-load row per MoE layer, none for a dense pattern) come from the loss.
    aux_shapes = jax.eval_shape(run, jax.tree.map(lambda x: x[0], batch))[0][1][1]
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
    (grads, total, aux), _ = jax.lax.scan(one, init, batch)
    return grads, total, aux


def _rebalanced(expert_bias, load, rate):
    if rate == 0.0 or load is None or load.shape[0] == 0:
        return expert_bias
    # expert_load rows follow the MoE layers in depth order.
    layer_of = lambda path: next(k.key for k in path if isinstance(getattr(k, "key", None), int))  # noqa: E731
    layers = sorted(layer_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(expert_bias))
    row = {layer: i for i, layer in enumerate(layers)}
    return jax.tree_util.tree_map_with_path(
        lambda path, bias: updated_expert_bias(bias, load[row[layer_of(path)]], rate), expert_bias)


def _advanced(rng: jax.Array) -> jax.Array:
    """The state's key for the next step (raw key data, so checkpoints hold plain uint32)."""
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])


@partial(jax.jit, static_argnames=("graphdef", "tx", "loss_fn", "bias_update_rate"), donate_argnames=("state",))
def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation, loss_fn,
               bias_update_rate: float = 0.0) -> tuple[TrainState, dict]:
    count = jnp.maximum(jnp.sum(batch["loss_mask"], dtype=jnp.float32), 1.0)
    grads, total, aux = _accumulate(state, graphdef, loss_fn, batch, 1.0 / count)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    load = aux.pop("expert_load", None)
    new_state = TrainState(params=params, expert_bias=_rebalanced(state.expert_bias, load, bias_update_rate),
                           opt_state=opt_state, step=state.step + 1, rng=_advanced(state.rng))
    new_state = constrain_tree(new_state)   # under a mesh: leave in the shardings we came in with
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "loss_tokens": count, **aux}
    if load is not None:
        metrics["expert_imbalance"] = load_imbalance(load) if load.shape[0] else jnp.float32(1.0)
    return new_state, metrics


@partial(jax.jit, static_argnames=("graphdef", "loss_fn"))
def eval_loss_sums(params, expert_bias, batch: dict, *, graphdef, loss_fn):
    """(Σ loss, token count) of one [B, T] batch; sum these over an eval set and divide once."""
    total, (count, _) = loss_fn(nnx.merge(graphdef, params, expert_bias), batch)
    return total, count
