"""Sampling: filtered_logits against a per-row Python reference, sample() against its distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cascade_jax.inference.sampling import SamplingParams, filtered_logits, sample

_filtered = jax.jit(filtered_logits)
_sample = jax.jit(sample)


def _reference(logits, temperature, top_k, top_p):
    """One row, the obvious way: sort token ids by (-logit, id), cut at k, then walk until the mass reaches p."""
    vocab = len(logits)
    out = np.full(vocab, -np.inf)
    if temperature == 0:
        out[int(np.argmax(logits))] = 0.0
        return out
    scaled = (np.float32(logits) / np.float32(temperature)).astype(np.float64)   # the same fp32 division
    order = sorted(range(vocab), key=lambda i: (-scaled[i], i))
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1:
        probs = np.exp(scaled[order] - scaled[order].max())
        probs /= probs.sum()
        kept, mass = [], 0.0
        for token, prob in zip(order, probs):
            if kept and mass >= top_p:
                break
            kept.append(token)
            mass += prob
        order = kept
    chosen = scaled[order]
    out[order] = chosen - (chosen.max() + np.log(np.exp(chosen - chosen.max()).sum()))
    return out


def _rows(settings):
    temperature, top_k, top_p = zip(*settings)
    return (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))


def test_filtered_logits_matches_reference():
    vocab = 50
    settings = list(itertools.product([0.0, 0.5, 1.0, 2.0], [0, 1, 5, vocab], [1.0, 0.9, 0.5, 1e-6]))
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (len(settings), vocab)).astype(np.float32)
    logits[1::2] = np.round(logits[1::2])   # every other row full of ties
    out = np.asarray(_filtered(jnp.asarray(logits), *_rows(settings)))
    for row, (t, k, p) in enumerate(settings):
        expected = _reference(logits[row], t, k, p)
        assert np.array_equal(np.isfinite(out[row]), np.isfinite(expected)), (row, t, k, p)
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-5, err_msg=str((row, t, k, p)))
    np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(-1), 1.0, atol=1e-6)
    # The filters really cut: k = 1 and tiny p keep one token, k = V and p = 1 at T > 0 keep all.
    kept = np.isfinite(out).sum(-1)
    for row, (t, k, p) in enumerate(settings):
        if t == 0 or k == 1 or p == 1e-6:
            assert kept[row] == 1
        elif k in (0, vocab) and p == 1.0:
            assert kept[row] == vocab


def test_top_k_ties_keep_exactly_k_lowest_ids():
    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    out = _filtered(logits, *_rows([(1.0, 2, 1.0)]))
    assert np.isfinite(np.asarray(out[0])).tolist() == [False, True, False, True, False, False]


def test_top_p_one_is_off_even_when_fp32_mass_saturates():
    logits = jnp.asarray([[30.0] + [0.0] * 63])   # the tail's mass is below fp32 resolution of 1
    out = np.asarray(_filtered(logits, *_rows([(1.0, 0, 1.0)])))
    assert np.isfinite(out).all()


def test_sample_is_deterministic_per_key():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 1, (16, 1000)), jnp.float32)
    params = _rows([(1.0, 0, 1.0)] * 16)
    keys = jax.random.split(jax.random.key(0), 16)
    first = _sample(keys, logits, *params)
    again = _sample(keys, logits, *params)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = _sample(jax.random.split(jax.random.key(1), 16), logits, *params)[0]
    assert (np.asarray(other) != np.asarray(first[0])).sum() >= 8


@pytest.mark.parametrize("temperature, top_k, top_p, expect_kept", [(0.7, 5, 0.9, 4), (1.3, 0, 1.0, 12)])
def test_sample_frequencies_match_filtered_distribution(temperature, top_k, top_p, expect_kept):
    draws = 20000
    logits = jnp.asarray(np.linspace(2.0, -1.5, 12) + np.random.default_rng(2).normal(0, 0.1, 12), jnp.float32)
    rows = jnp.broadcast_to(logits, (draws, 12))
    params = _rows([(temperature, top_k, top_p)] * draws)
    tokens = np.asarray(_sample(jax.random.split(jax.random.key(3), draws), rows, *params)[0])
    probs = np.exp(np.asarray(_filtered(logits[None], *_rows([(temperature, top_k, top_p)]))[0], np.float64))
    kept = probs > 0
    assert kept.sum() == expect_kept          # both filters matter in the first case, neither in the second
    counts = np.bincount(tokens, minlength=12)
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws / probs[kept].sum()
    assert expected.min() >= 5                 # chi-square needs no tiny cells
    p_value = scipy.stats.chisquare(counts[kept], expected).pvalue
    assert p_value > 1e-3, (counts, expected)


def test_returned_logprobs_are_those_of_the_drawn_token():
    settings = [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0), (1.5, 40, 0.95), (0.3, 1, 1.0), (2.0, 0, 0.5)]
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(0, 2, (len(settings), 100)), jnp.float32)
    params = _rows(settings)
    tokens, logprob_sampled, logprob_model = _sample(jax.random.split(jax.random.key(5), len(settings)), logits,
                                                     *params)
    rows = np.arange(len(settings))
    filtered = np.asarray(_filtered(logits, *params))
    model = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert np.isfinite(filtered[rows, tokens]).all()
    np.testing.assert_allclose(logprob_sampled, filtered[rows, tokens], atol=1e-6)
    np.testing.assert_allclose(logprob_model, model[rows, tokens], atol=1e-6)


def test_greedy_rows_take_argmax_with_logprob_zero():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 1, (4, 64)).astype(np.float32)
    logits[2, [7, 30]] = logits[2].max() + 1          # a tie for the max: argmax takes the lower id
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.0, 5, 0.3), (0.0, 64, 1.0)]
    tokens, logprob_sampled, _ = _sample(jax.random.split(jax.random.key(7), 4), jnp.asarray(logits), *_rows(settings))
    greedy = [0, 2, 3]
    np.testing.assert_array_equal(np.asarray(tokens)[greedy], logits[greedy].argmax(-1))
    assert int(tokens[2]) == 7
    assert (np.asarray(logprob_sampled)[greedy] == 0).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(n=0), "n"),
    (dict(stop_token_ids=(1, -2)), "stop_token_ids"),
    (dict(stop_token_ids=(1.0,)), "stop_token_ids"),
    (dict(stop_token_ids=3), "stop_token_ids"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"SamplingParams.{field}: expected ")
    assert repr(next(iter(kwargs.values()))) in message


def test_sampling_params_defaults_and_list_stops():
    assert str(pytest.raises(ValueError, SamplingParams, top_p=0).value) == \
        "SamplingParams.top_p: expected a value in (0, 1], got 0"
    params = SamplingParams(temperature=0, top_p=1, stop_token_ids=[2, 0])
    assert params.stop_token_ids == (2, 0)
    assert SamplingParams().stop_token_ids == ()
