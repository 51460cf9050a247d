"""A document in a packed row computes exactly what it computes alone."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cascade_jax as cj


def test_packed_documents_match_documents_alone():
    # Chunk 8 and conv width 4: one document crosses chunk boundaries, one is shorter than the conv.
    config = cj.ModelConfig.preset("tiny").replace(layer_pattern="M*E-M", chunk_size=8, vocab_size=97)
    model = cj.NemotronH(config, rngs=nnx.Rngs(3))
    lengths = [13, 2, 9]
    docs = [jax.random.randint(jax.random.key(i), (1, n), 0, config.vocab_size) for i, n in enumerate(lengths)]
    padding = 4
    packed = jnp.concatenate(docs + [jnp.zeros((1, padding), jnp.int32)], axis=1)
    segment_ids = jnp.array([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0] * padding], jnp.int32)
    packed_logits = np.asarray(model(packed, segment_ids=segment_ids).logits)
    start = 0
    for doc in docs:
        alone = np.asarray(model(doc).logits)
        got = packed_logits[:, start:start + doc.shape[1]]
        assert np.abs(got - alone).max() <= 1e-5 * max(1.0, np.abs(alone).max())
        start += doc.shape[1]


def test_expert_load_ignores_padding():
    config = cj.ModelConfig.preset("tiny").replace(layer_pattern="E")
    model = cj.NemotronH(config, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 10), jnp.int32)
    segment_ids = jnp.array([[1] * 6 + [0] * 4])
    load = model(ids, segment_ids=segment_ids).expert_load
    assert load.shape == (1, config.n_routed_experts)
    assert int(load.sum()) == 6 * config.num_experts_per_tok


def test_hidden_states_without_logits():
    config = cj.ModelConfig.preset("tiny")
    model = cj.NemotronH(config, rngs=nnx.Rngs(0))
    out = model(jnp.ones((1, 5), jnp.int32), compute_logits=False)
    assert out.logits is None
    assert out.hidden_states.shape == (1, 5, config.hidden_size)
    np.testing.assert_allclose(model.logits(out.hidden_states), model(jnp.ones((1, 5), jnp.int32)).logits,
                               rtol=1e-6, atol=1e-6)
