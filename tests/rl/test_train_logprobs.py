"""Training log-probs of sampled tokens (packed rows, chunked lm_head) equal the sampler's own log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cascade_jax as cj
from cascade_jax.inference import SamplingParams, generate
from cascade_jax.ops.cross_entropy import token_log_probs
from cascade_jax.ops.sampling import filtered_logits
from cascade_jax.rl.logprobs import SamplingFilter, micro_batched_log_probs
from cascade_jax.rl.packing import micro_batches, pack_rollouts
from cascade_jax.train.state import split_model

FIXTURE = "mamba_moe_attn"   # Mamba, MoE and attention layers
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(request):
    return cj.load_pretrained(request.config.rootpath / "tests" / "fixtures" / "hf" / FIXTURE)


_ROLLOUTS = {}


def _rollouts(model, temperature, top_p, top_k):
    """Generated once per setting, shared by the packed and the one-per-row layout."""
    key = (temperature, top_p, top_k)
    if key not in _ROLLOUTS:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, model.config.vocab_size, n).tolist() for n in (3, 11, 7, 20)]
        params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k, n=2)
        _ROLLOUTS[key] = prompts, params, generate(model, prompts, params, seed=5)
    return _ROLLOUTS[key]


def _one_per_row(prompts, completions, row_len):
    rows = [pack_rollouts([p], [c.tokens], [c.logprobs], row_len) for p, c in zip(prompts, completions)]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.95, 0), (0.8, 0.95, 20)])
@pytest.mark.parametrize("packed", [False, True], ids=["one-per-row", "packed"])
def test_training_logprobs_equal_sampler_logprobs(model, temperature, top_p, top_k, packed):
    prompts, params, out = _rollouts(model, temperature, top_p, top_k)
    repeated = [p for p in prompts for _ in range(params.n)]
    if packed:
        rows = pack_rollouts(repeated, [c.tokens for c in out], [c.logprobs for c in out], 160)
        assert rows["segment_ids"].max() > 2
    else:
        rows = _one_per_row(repeated, out, 40)
    batch = micro_batches(rows, 2)
    graphdef, params_state, expert_bias = split_model(model)
    train_logp = micro_batched_log_probs(params_state, expert_bias, batch, graphdef=graphdef,
                                         sampling=SamplingFilter(temperature, top_k, top_p), chunk_size=16)
    mask = batch["loss_mask"] > 0
    assert mask.sum() == sum(len(c.tokens) for c in out)
    np.testing.assert_allclose(np.asarray(train_logp)[mask], batch["inf_logp"][mask], atol=TOLERANCE)


def test_filtered_chunked_logprobs_match_full_filter_and_have_finite_gradients():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (37, 16))
    kernel = jax.random.normal(k[1], (16, 50))
    full = filtered_logits(hidden @ kernel, jnp.full(37, 0.7), jnp.full(37, 10), jnp.full(37, 0.9))
    targets = jnp.argmax(full + jax.random.gumbel(k[2], full.shape), axis=-1)   # tokens the filter allows
    want = jnp.take_along_axis(full, targets[:, None], -1)[:, 0]
    got = token_log_probs(hidden, kernel, targets, chunk_size=8, sampling=(0.7, 10, 0.9))
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = token_log_probs(hidden, kernel, targets, chunk_size=8, sampling=(1.0, 0, 1.0))
    np.testing.assert_allclose(plain, token_log_probs(hidden, kernel, targets, chunk_size=8), atol=1e-5)
    grads = jax.grad(lambda h, w: token_log_probs(h, w, targets, 8, (0.7, 10, 0.9)).sum(), argnums=(0, 1))(
        hidden, kernel)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    # The gradient is that of log_softmax over the kept tokens (the kept set itself is not differentiated).
    kept = jnp.isfinite(full)
    def reference(h, w):
        scaled = (h @ w) / 0.7
        return jnp.take_along_axis(jax.nn.log_softmax(jnp.where(kept, scaled, -jnp.inf), -1), targets[:, None],
                                   -1).sum()
    ref_grads = jax.grad(reference, argnums=(0, 1))(hidden, kernel)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_model_merge_roundtrip_is_the_model(model):
    graphdef, params_state, expert_bias = split_model(model)
    merged = nnx.merge(graphdef, params_state, expert_bias)
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    np.testing.assert_array_equal(model(tokens).logits, merged(tokens).logits)
