"""A very small NemotronH and its loss, shared by the sharding tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cascade_jax as cj
from cascade_jax.model.layers import ExpertBias
from cascade_jax.model.nemotron_h import Backends

SMALL = dict(vocab_size=256, hidden_size=64, layer_pattern="ME*E-", num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=8,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             moe_shared_expert_intermediate_size=32, intermediate_size=64)


def small_model(dispatch="local", capacity_factor=None, seed=0):
    config = cj.ModelConfig.preset("tiny").replace(**SMALL)
    return cj.NemotronH(config, rngs=nnx.Rngs(seed),
                        backends=Backends(moe_dispatch=dispatch, moe_capacity_factor=capacity_factor))


def batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 256, (rows, length)).astype(np.int32)
    # packed rows: two documents, then padding on odd rows
    segment_ids = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(rows, 0).astype(np.int32)
    segment_ids[1::2, -3:] = 0
    return {"tokens": tokens, "segment_ids": segment_ids}


def loss_fn(params, rest, graphdef, tokens, segment_ids):
    """Mean next-token NLL over non-padding positions, plus the logits and the dropped count."""
    out = nnx.merge(graphdef, params, rest)(tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32)[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (segment_ids[:, 1:] > 0).astype(jnp.float32)
    return (nll * mask).sum() / mask.sum(), (out.logits, out.dropped_tokens)


def split(model):
    return nnx.split(model, nnx.Param, ExpertBias)


def assert_close(got, want, rtol=1e-5):
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(np.abs(w).max(), 1e-30)
        assert np.abs(g - w).max() <= rtol * scale, (jax.tree_util.keystr(path[0]), np.abs(g - w).max(), scale)
