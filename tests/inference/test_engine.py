"""The slot engine: what it samples is what the model says, whatever the batch and slot history."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax as cj
from cascade_jax.inference import Engine, SamplingParams, generate
from cascade_jax.inference.engine import COMPILATIONS
from cascade_jax.inference.sampling import filtered_logits

FIXTURE = "mamba_moe_attn"   # M, E and * layers
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(request):
    return cj.load_pretrained(request.config.rootpath / "tests" / "fixtures" / "hf" / FIXTURE)


def _prompts(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, model.config.vocab_size, n).tolist() for n in lengths]


def _full_forward_logits(model, prompt, completion):
    """Logits predicting each completion token, from one uncached forward over prompt + completion."""
    whole = jnp.asarray([list(prompt) + completion.tokens], jnp.int32)
    return np.asarray(model(whole).logits[0, len(prompt) - 1:-1], np.float32)


def test_logprobs_equal_a_fresh_full_forward_with_slot_reuse(model):
    """5 prompts through 2 slots: later prompts enter a slot while the other one is decoding."""
    prompts = _prompts(model, (1, 2, 5, 13, 30))
    params = [SamplingParams(max_new_tokens=m, temperature=t, top_k=k, top_p=p)
              for m, t, k, p in ((9, 1.0, 0, 1.0), (4, 0.7, 5, 1.0), (12, 1.3, 0, 0.9), (6, 0.0, 0, 1.0),
                                 (10, 1.0, 40, 0.8))]
    engine = Engine(model, max_slots=2, max_len=64, sync_every=4)
    out = generate(model, prompts, params, seed=3, engine=engine)
    for prompt, p, completion in zip(prompts, params, out):
        assert len(completion.tokens) == p.max_new_tokens and completion.finish_reason == "length"
        logits = _full_forward_logits(model, prompt, completion)
        tokens = np.asarray(completion.tokens)[:, None]
        model_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), tokens, -1)[:, 0]
        np.testing.assert_allclose(completion.model_logprobs, model_lp, atol=TOLERANCE)
        rows = len(tokens)
        sampled = filtered_logits(jnp.asarray(logits), jnp.full(rows, p.temperature), jnp.full(rows, p.top_k),
                                  jnp.full(rows, p.top_p))
        sampled_lp = np.take_along_axis(np.asarray(sampled), tokens, -1)[:, 0]
        np.testing.assert_allclose(completion.logprobs, sampled_lp, atol=TOLERANCE)


def test_greedy_is_batch_invariant_and_seeded_sampling_repeats(model):
    prompts = _prompts(model, (3, 17, 8, 1), seed=1)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    together = generate(model, prompts, greedy)
    for prompt, completion in zip(prompts, together):
        assert generate(model, [prompt], greedy)[0].tokens == completion.tokens
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, n=3)
    first, again = generate(model, prompts[:2], hot, seed=5), generate(model, prompts[:2], hot, seed=5)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert len({tuple(c.tokens) for c in first[:3]}) > 1          # the n samples of one prompt differ
    assert [c.sample_index for c in first] == [0, 1, 2, 0, 1, 2]
    assert [c.tokens for c in generate(model, prompts[:2], hot, seed=6)] != [c.tokens for c in first]


def test_stop_tokens_and_length(model):
    prompt = _prompts(model, (6,), seed=2)[0]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    stop = free.tokens[3]
    stopped = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[stop]))[0]
    first_stop = free.tokens.index(stop)
    assert stopped.tokens == free.tokens[:first_stop + 1] and stopped.finish_reason == "stop"
    assert len(stopped.logprobs) == len(stopped.tokens) == len(stopped.model_logprobs)


def test_new_parameters_reuse_the_compiled_functions(model):
    engine = Engine(model, max_slots=4, max_len=48, sync_every=4)
    prompts = _prompts(model, (4, 9), seed=4)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = generate(model, prompts, params, engine=engine)
    compiled = dict(COMPILATIONS)
    changed = jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, model)
    after = generate(changed, prompts, params, engine=engine)
    assert dict(COMPILATIONS) == compiled
    assert [c.tokens for c in after] != [c.tokens for c in before]
    assert [c.tokens for c in after] == [c.tokens for c in generate(changed, prompts, params)]


def test_bad_requests_are_refused_in_one_line(model):
    engine = Engine(model, max_slots=2, max_len=32)
    with pytest.raises(ValueError, match="needs 36 cache entries; this engine holds 32"):
        engine.submit([1] * 10, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        engine.submit([1, 512], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], SamplingParams(max_new_tokens=2))


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_slots=1, max_len=64, sync_every=2)
    long, short = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=40))[0], None
    engine.step()
    short = engine.submit([8, 9], SamplingParams(max_new_tokens=3, temperature=0.0))[0]
    engine.cancel(long)
    engine.run()
    assert long.finish_reason == "cancelled" and 0 < len(long.tokens) < 40
    assert short.finish_reason == "length" and len(short.tokens) == 3
