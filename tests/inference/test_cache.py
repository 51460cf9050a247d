"""Cached inference equals the full forward: a prefill into a HybridCache followed by one-token decode
steps gives, at every position, the log-probs of one whole-row forward over prompt + continuation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cascade_jax as cj
from cascade_jax.model.cache import HybridCache
from cascade_jax.ops.ssd import ssd_reference, ssd_step

FIXTURE = "mamba_moe_attn"   # M, E and * layers
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(request):
    return cj.load_pretrained(request.config.rootpath / "tests" / "fixtures" / "hf" / FIXTURE)


def _logprobs(logits):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def _left_padded(prompts, width):
    tokens = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
        segments[row, width - len(p):] = 1
    return jnp.asarray(tokens), jnp.asarray(segments)


@nnx.jit
def _prefill(model, tokens, segments, cache):
    out = model(tokens, segments, cache=cache)
    return out.logits, out.cache


@nnx.jit
def _decode(model, token, segment, cache):
    out = model(token[:, None], segment[:, None], cache=cache)
    return out.logits[:, 0], out.cache


@pytest.mark.parametrize("lengths", [(1, 2, 3, 9, 30), (37,)])
def test_prefill_then_decode_equals_the_full_forward(model, lengths):
    rng = np.random.default_rng(len(lengths))
    vocab, steps, width = model.config.vocab_size, 12, max(lengths)
    prompts = [rng.integers(1, vocab, n) for n in lengths]            # 1 and 2: shorter than the conv width
    continuation = rng.integers(1, vocab, (len(prompts), steps))       # fed back token by token
    tokens, segments = _left_padded(prompts, width)
    cache = HybridCache.init(model.config, len(prompts), width + steps)
    prefill_logits, cache = _prefill(model, tokens, segments, cache)
    decoded = [prefill_logits[:, -1]]
    for t in range(steps):
        logits, cache = _decode(model, jnp.asarray(continuation[:, t]), jnp.ones(len(prompts), jnp.int32), cache)
        decoded.append(logits)
    decoded = _logprobs(jnp.stack(decoded, axis=1))[:, :-1]             # predictions after prompt[-1], c[0], …
    assert np.asarray(cache.lengths).tolist() == [width + steps] * len(prompts)
    for row, prompt in enumerate(prompts):                             # each row alone, no padding, no cache
        whole = np.concatenate([prompt, continuation[row]])[None]
        expected = _logprobs(model(jnp.asarray(whole, jnp.int32)).logits)[0, len(prompt) - 1:-1]
        np.testing.assert_allclose(decoded[row], expected, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(_logprobs(prefill_logits)[row, width - len(prompt):],
                                   _logprobs(model(jnp.asarray(prompt[None], jnp.int32)).logits)[0], atol=TOLERANCE)


def test_a_row_prefilled_while_others_decode_is_exact(model):
    """Row 1 is reset and refilled with a new prompt between decode steps of row 0 (a slot pool)."""
    rng = np.random.default_rng(7)
    vocab = model.config.vocab_size
    first, second = rng.integers(1, vocab, 6), rng.integers(1, vocab, 4)
    feed = rng.integers(1, vocab, 10)
    cache = HybridCache.init(model.config, 2, 32)
    tokens, segments = _left_padded([first, first], 6)
    _, cache = _prefill(model, tokens, segments, cache)
    for t in range(3):
        _, cache = _decode(model, jnp.asarray([feed[t], feed[t]]), jnp.ones(2, jnp.int32), cache)
    tokens, segments = _left_padded([second], 8)
    _, fresh = _prefill(model, tokens, segments, HybridCache.init(model.config, 1, 32))
    cache = cache.with_rows(jnp.asarray([1]), fresh)
    out = []
    for t in range(3, 10):
        logits, cache = _decode(model, jnp.asarray([feed[t], feed[t]]), jnp.ones(2, jnp.int32), cache)
        out.append(_logprobs(logits))
    whole_0 = np.concatenate([first, feed[:10]])[None]
    whole_1 = np.concatenate([second, feed[3:10]])[None]
    expected_0 = _logprobs(model(jnp.asarray(whole_0, jnp.int32)).logits)[0, len(first) + 3:]
    expected_1 = _logprobs(model(jnp.asarray(whole_1, jnp.int32)).logits)[0, len(second):]
    np.testing.assert_allclose(np.stack([o[0] for o in out]), expected_0, atol=TOLERANCE)
    np.testing.assert_allclose(np.stack([o[1] for o in out]), expected_1, atol=TOLERANCE)


def test_ssd_step_is_the_recurrence():
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (2, 5, 4, 3))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (2, 5, 4)))
    A = -jnp.exp(jax.random.normal(keys[2], (4,)))
    B, C = jax.random.normal(keys[3], (2, 5, 2, 6)), jax.random.normal(keys[4], (2, 5, 2, 6))
    state0 = jax.random.normal(keys[5], (2, 4, 3, 6))
    y_ref, final_ref = ssd_reference(x, dt, A, B, C, initial_state=state0)
    state, ys = state0, []
    for t in range(5):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
    np.testing.assert_allclose(np.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, final_ref, rtol=1e-5, atol=1e-5)
