"""The pure train step with the loss as an argument: global-token normalisation, accumulation, RNG."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.nemotron_h import NemotronH
from cascade_jax.train.state import init_train_state
from cascade_jax.train.step import NextTokenLoss, eval_loss_sums, train_step

CONFIG = ModelConfig.preset("tiny").replace(layer_pattern="ME*", vocab_size=128, hidden_size=32)


def _state():
    return init_train_state(NemotronH(CONFIG, rngs=nnx.Rngs(0)), optax.sgd(0.1), seed=3)


def _batch(rows=4, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 128, (rows, length)).astype(np.int32)
    mask = (rng.random((rows, length)) < 0.7).astype(np.int32)
    mask[0] = 0   # a row without loss tokens still counts nothing
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
            "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


@dataclasses.dataclass(frozen=True)
class SquaredHidden:
    """Another loss through the same step: Σ over loss tokens of the mean squared final hidden state."""

    def __call__(self, model, micro_batch):
        out = model(micro_batch["tokens"], segment_ids=micro_batch["segment_ids"], compute_logits=False)
        per_token = jnp.mean(jnp.square(out.hidden_states.astype(jnp.float32)), axis=-1)
        mask = micro_batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(per_token * mask), (jnp.sum(mask), {"rows": jnp.ones((), jnp.int32) * mask.shape[0]})


def test_micro_batches_give_the_global_token_mean():
    batch = _batch()
    graphdef, state = _state()
    one = jax.tree.map(lambda x: x[None], batch)                          # [1, 4, T]
    two = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), batch)    # [2, 2, T]
    loss_fn = NextTokenLoss(chunk_size=8)
    s1, m1 = train_step(jax.tree.map(jnp.copy, state), one, graphdef=graphdef, tx=optax.sgd(0.1), loss_fn=loss_fn)
    s2, m2 = train_step(jax.tree.map(jnp.copy, state), two, graphdef=graphdef, tx=optax.sgd(0.1), loss_fn=loss_fn)
    total, count = eval_loss_sums(state.params, state.expert_bias, batch, graphdef=graphdef, loss_fn=loss_fn)
    np.testing.assert_allclose(float(m1["loss"]), float(total / count), rtol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    assert float(m1["loss_tokens"]) == batch["loss_mask"].sum()
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_any_loss_and_its_aux_sums_and_the_rng_advances():
    graphdef, state = _state()
    batch = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), _batch())
    rng_before = np.asarray(state.rng).copy()
    state, metrics = train_step(state, batch, graphdef=graphdef, tx=optax.sgd(0.1), loss_fn=SquaredHidden())
    assert int(metrics["rows"]) == 4 and "expert_imbalance" not in metrics   # aux summed over micro-batches
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    rng_after = np.asarray(state.rng).copy()
    assert not np.array_equal(rng_before, rng_after)
    state, _ = train_step(state, batch, graphdef=graphdef, tx=optax.sgd(0.1), loss_fn=SquaredHidden())
    assert not np.array_equal(np.asarray(state.rng), rng_after)
