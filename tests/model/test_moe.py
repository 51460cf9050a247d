import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.config import ModelConfig
from cascade_jax.model.moe import MoEMixer, dropless_experts, experts_reference, route


def _route_by_hand(logits, bias, top_k, n_group, topk_group, scale):
    """Per-token Python loop over the DeepSeek-V3 rule (sigmoid scores, bias for selection only)."""
    scores = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    choice = scores + np.asarray(bias, np.float64)
    per_group = choice.shape[1] // n_group
    weights, indices = [], []
    for s, c in zip(scores, choice):
        group_score = [sorted(c[g * per_group:(g + 1) * per_group])[-2:] for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for e in range(len(c)) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -c[e])[:top_k]
        w = np.array([s[e] for e in chosen])
        weights.append(scale * w / (w.sum() + 1e-20))
        indices.append(chosen)
    return np.array(weights), np.array(indices)


@pytest.mark.parametrize("experts, top_k, n_group, topk_group", [(8, 2, 1, 1), (16, 4, 4, 2), (12, 3, 3, 1)])
def test_route_matches_hand_written_rule(experts, top_k, n_group, topk_group):
    logits = jax.random.normal(jax.random.key(experts), (40, experts))
    bias = 0.1 * jax.random.normal(jax.random.key(1), (experts,))
    w, idx = route(logits, bias, top_k, n_group, topk_group, 2.5, True)
    w_ref, idx_ref = _route_by_hand(logits, bias, top_k, n_group, topk_group, 2.5)
    order = np.argsort(np.asarray(idx), axis=1)
    order_ref = np.argsort(idx_ref, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1),
                                  np.take_along_axis(idx_ref, order_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(w_ref, order_ref, 1), rtol=1e-6)


def test_bias_changes_selection_not_weights():
    logits = jnp.array([[0.0, 0.1, 0.2, 0.3]])
    w, idx = route(logits, jnp.array([5.0, 0.0, 0.0, 0.0]), 1, 1, 1, 1.0, False)
    assert int(idx[0, 0]) == 0
    np.testing.assert_allclose(w[0, 0], jax.nn.sigmoid(0.0), rtol=1e-7)


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 4, 1), (23, 8, 2), (64, 16, 6)])
def test_dropless_dispatch_matches_reference(tokens, experts, top_k):
    k = jax.random.split(jax.random.key(tokens), 4)
    x = jax.random.normal(k[0], (tokens, 12))
    up = 0.3 * jax.random.normal(k[1], (experts, 12, 20))
    down = 0.3 * jax.random.normal(k[2], (experts, 20, 12))
    w, idx = route(jax.random.normal(k[3], (tokens, experts)), jnp.zeros(experts), top_k, 1, 1, 1.0, True)
    np.testing.assert_allclose(dropless_experts(x, w, idx, up, down), experts_reference(x, w, idx, up, down),
                               rtol=1e-5, atol=1e-5)


def test_mixer_reports_tokens_per_expert():
    config = ModelConfig.preset("tiny")
    mixer = MoEMixer(config, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (2, 9, config.hidden_size))
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [4]])
    _, load = mixer(u, mask)
    assert load.shape == (config.n_routed_experts,)
    assert int(load.sum()) == (9 + 4) * config.num_experts_per_tok
    _, full = mixer(u)
    assert int(full.sum()) == 18 * config.num_experts_per_tok
