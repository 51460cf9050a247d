"""cascade_jax.rl.losses against independent float64 NumPy computations, eager and under jit, with gradients.

Compilation dominates the run time, so each jitted call computes every static configuration (mode, kind,
clip band, aggregation) of a function at once, and eager runs use one shape (op-by-op dispatch caches per shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.rl import losses

TOLERANCES = {"fp32": dict(rtol=1e-5, atol=1e-6), "fp64": dict(rtol=1e-6, atol=1e-12)}
# (shape, use_jit): (1, 1) has no token at all (random_mask empties the first row); eager runs on one shape only.
RUNS = [
    pytest.param((1, 1), True, id="1x1-jit"),
    pytest.param((3, 7), False, id="3x7-eager"),
    pytest.param((8, 33), True, id="8x33-jit"),
]
# The same in fp32, and jitted in fp64 (with the `precision` fixture, indirect).
PRECISION_RUNS = [pytest.param("fp32", *run.values, id=f"fp32-{run.id}") for run in RUNS] + [
    pytest.param("fp64", (8, 33), True, id="fp64-8x33-jit"),
]
LARGEST = (8, 33)


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


class Precision:
    def __init__(self, name: str):
        self.dtype = jnp.float64 if name == "fp64" else jnp.float32
        self.tol = TOLERANCES[name]

    def cast(self, *arrays):
        """The arrays in this precision; the reference then reads back exactly the values the function sees."""
        return tuple(np.asarray(a, self.dtype) for a in arrays)  # host-side: no device cast to compile


@pytest.fixture
def precision(request):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param == "fp64")
    yield Precision(request.param)
    jax.config.update("jax_enable_x64", previous)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# LLVM at -O0 without its expensive passes: XLA's program is the same, compiling it (most of this file's run
# time) is about 3x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn):
    """jax.jit(fn), compiled with FAST_COMPILE."""
    jitted = jax.jit(fn)

    def call(*args, **kwargs):
        return jitted.lower(*args, **kwargs).compile(compiler_options=FAST_COMPILE)(*args, **kwargs)

    return call


def maybe_jit(fn, use_jit: bool):
    return jit(fn) if use_jit else fn


def random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random token mask whose first row is fully masked (so a (1, 1) batch has no token at all)."""
    mask = rng.random(shape) < 0.7
    mask[0] = False
    if shape[0] > 2:
        mask[-1] = True
    return mask


def token_batch(rng: np.random.Generator, shape: tuple[int, int], spread: float = 0.3):
    """logp < 0 and a second log-prob nearby, so ratios straddle the clip band."""
    logp = -rng.exponential(1.0, shape)
    other = logp + spread * rng.standard_normal(shape)
    return logp, other


def finite_difference(fn, x: np.ndarray, step: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        bump = np.zeros_like(x)
        bump[index] = step
        grad[index] = (fn(x + bump) - fn(x - bump)) / (2 * step)
    return grad


# ---------------------------------------------------------------- NumPy references (float64, loops where clearer)


def np_group_advantages(rewards, group_size, leave_one_out, normalize_std, eps=1e-6):
    rewards = f64(rewards)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        if np.all(group == group[0]):
            continue
        for i in range(group_size):
            if leave_one_out:
                baseline, std = np.delete(group, i).mean(), group.std(ddof=1)
            else:
                baseline, std = group.mean(), group.std(ddof=0)
            centred = group[i] - baseline
            out[start + i] = centred / (std + eps) if normalize_std else centred
    return out


def np_importance_weights(train, inf, mask, mode, low, high):
    ratio = np.exp(f64(train) - f64(inf))
    if mode == "icepop":
        weights = np.where((ratio >= low) & (ratio <= high), ratio, 0)
    elif mode == "tis":
        weights = np.clip(ratio, low, high)
    else:
        weights = np.ones_like(ratio)
    return np.where(mask, weights, 0)


def np_kl(logp, ref, kind):
    logp, ref = f64(logp), f64(ref)
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = np.clip(ref - logp, -20, 20)
    return np.minimum(np.exp(d) - d - 1, 10)


def np_k3_grad(logp, ref):
    d = f64(ref) - f64(logp)
    inside = (np.abs(d) < 20) & (np.exp(d) - d - 1 < 10)
    return np.where(inside, 1 - np.exp(d), 0)


def np_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, aggregation="token", num_tokens=None,
                   is_weights=None, kl=None, kl_coef=0.0):
    logp, old, adv, m = f64(logp), f64(old), f64(adv), f64(mask)
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], logp.shape[1], axis=1)
    w = np.ones_like(logp) if is_weights is None else f64(is_weights)
    kl = np.zeros_like(logp) if kl is None else f64(kl)
    ratio = np.exp(logp - old)
    low = -np.inf if clip_low is None else 1 - clip_low
    high = np.inf if clip_high is None else 1 + clip_high
    per_token = -w * np.minimum(ratio * adv, np.clip(ratio, low, high) * adv) + kl_coef * kl
    if aggregation == "token":
        count = m.sum() if num_tokens is None else num_tokens
        loss = (per_token * m).sum() / max(count, 1)
    else:
        rows = [(per_token[b] * m[b]).sum() / m[b].sum() for b in range(len(m)) if m[b].sum() > 0]
        loss = np.mean(rows) if rows else 0.0
    # The clipped branch matters only in the direction of the advantage's sign.
    clipped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    count = max(m.sum(), 1)
    metrics = {
        "clip_fraction": (clipped * m).sum() / count,
        "ratio_mean": (ratio * m).sum() / count,
        "advantage_abs_mean": (np.abs(adv) * m).sum() / count,
        "kl_mean": (kl * m).sum() / count,
    }
    return loss, metrics


# ---------------------------------------------------------------- group_advantages

ADVANTAGE_CONFIGS = [(loo, norm) for loo in (False, True) for norm in (True, False)]


@pytest.mark.parametrize("precision, use_jit", [("fp32", False), ("fp32", True), ("fp64", True)], indirect=["precision"])
def test_group_advantages_matches_numpy(precision, use_jit):
    rng = np.random.default_rng(0)
    group_sizes = (1, 2, 5) if use_jit else (5,)  # eager dispatch compiles every op again for each shape
    num_groups = 6
    rewards = {f"{g}-{kind}": r for g in group_sizes for kind, r in zip(("binary", "continuous"), precision.cast(
        (rng.random(num_groups * g) < 0.5).astype(np.float64), rng.standard_normal(num_groups * g)))}
    cases = [(name, int(name.split("-")[0]), loo, norm) for name in rewards for loo, norm in ADVANTAGE_CONFIGS
             if name[0] != "1" or not loo]

    def every_case(rewards):
        return {f"{name}-{loo}-{norm}": losses.group_advantages(rewards[name], g, leave_one_out=loo,
                                                                normalize_std=norm)
                for name, g, loo, norm in cases}

    results = maybe_jit(every_case, use_jit)(rewards)
    for name, g, loo, norm in cases:
        advantages = results[f"{name}-{loo}-{norm}"]
        assert advantages.dtype == precision.dtype and advantages.shape == rewards[name].shape
        np.testing.assert_allclose(advantages, np_group_advantages(rewards[name], g, loo, norm), **precision.tol,
                                   err_msg=f"{name} leave_one_out={loo} normalize_std={norm}")


def test_group_advantages_equal_groups_are_exactly_zero():
    # 0.1 and 0.7 are not representable: the mean of three copies is off by an ulp.
    rewards = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0], np.float32)
    results = jit(lambda r: [losses.group_advantages(r, 3, leave_one_out=loo, normalize_std=norm)
                                 for loo, norm in ADVANTAGE_CONFIGS])(rewards)
    for advantages in results:
        advantages = np.asarray(advantages)
        assert np.all(advantages[:9] == 0) and np.all(advantages[9:] != 0)


def test_group_advantages_int_and_bool_rewards_and_static_argnames():
    # Plain jax.jit here, with the Python arguments static by name, as a caller would write it.
    fn = jax.jit(losses.group_advantages, static_argnames=("group_size", "leave_one_out", "normalize_std"))
    ints, bools = np.array([0, 1, 1, 1, 2, 0], np.int32), np.array([False, True, True, True, True, False])
    for rewards, leave_one_out in ((ints, False), (bools, True)):
        advantages = fn(rewards, 3, leave_one_out=leave_one_out)
        assert advantages.dtype == jnp.float32
        np.testing.assert_allclose(advantages, np_group_advantages(rewards, 3, leave_one_out, True), rtol=1e-5)


@pytest.mark.parametrize("call", [
    lambda: losses.group_advantages(np.zeros(7), 2),
    lambda: losses.group_advantages(np.zeros(4), 1, leave_one_out=True),
    lambda: losses.group_advantages(np.zeros((2, 4)), 4),
    lambda: losses.group_advantages(np.zeros(4), 0),
    lambda: losses.dynamic_filter(np.zeros(5), 2),
    lambda: losses.group_max_mask(np.zeros(5), 3, 0.5),
])
def test_group_shape_errors_are_one_line_value_errors(call):
    with pytest.raises(ValueError) as error:
        call()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- importance_weights

IS_MODES = ["icepop", "tis", "none"]


@pytest.mark.parametrize("precision, shape, use_jit", PRECISION_RUNS, indirect=["precision"])
def test_importance_weights_matches_numpy(precision, shape, use_jit):
    rng = np.random.default_rng(shape[0] * shape[1])
    train, inf = precision.cast(*token_batch(rng, shape, spread=0.8))
    mask = random_mask(rng, shape)
    fn = maybe_jit(lambda a, b, m: {mode: losses.importance_weights(a, b, m, mode=mode, low=0.6, high=1.5)
                                    for mode in IS_MODES}, use_jit)
    results = fn(train, inf, mask)
    for mode in IS_MODES:
        assert results[mode].dtype == precision.dtype
        np.testing.assert_allclose(results[mode], np_importance_weights(train, inf, mask, mode, 0.6, 1.5),
                                   **precision.tol, err_msg=mode)
    if shape == LARGEST:  # the test means something only if some ratios leave the band
        ratio = np.exp(f64(train) - f64(inf))[mask]
        assert ((ratio < 0.6) | (ratio > 1.5)).any() and ((ratio >= 0.6) & (ratio <= 1.5)).any()


def test_importance_weights_band_is_inclusive_and_carries_no_gradient():
    zeros = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(losses.importance_weights(zeros, zeros, zeros == 0, low=1.0, high=1.0), 1.0)
    train, inf = (np.float32(a) for a in token_batch(np.random.default_rng(0), (3, 4), spread=0.8))
    mask = np.ones((3, 4), np.float32)
    grads = jit(jax.grad(lambda t: sum(losses.importance_weights(t, inf, mask, mode=mode).sum()
                                           for mode in IS_MODES)))(train)
    np.testing.assert_array_equal(grads, 0.0)
    with pytest.raises(ValueError):
        losses.importance_weights(train, inf, mask, mode="ppo")


# ---------------------------------------------------------------- kl_penalty

KL_KINDS = ["k1", "k2", "k3"]


def kl_batch(rng, shape):
    logp, ref = token_batch(rng, shape, spread=1.5)
    ref.flat[::7] += 30.0 * rng.choice([-1, 1], ref.flat[::7].shape)  # beyond the ±20 clamp on d
    return logp, ref


@pytest.mark.parametrize("precision, shape, use_jit", PRECISION_RUNS, indirect=["precision"])
def test_kl_penalty_matches_numpy(precision, shape, use_jit):
    logp, ref = precision.cast(*kl_batch(np.random.default_rng(shape[1]), shape))
    results = maybe_jit(lambda a, b: {kind: losses.kl_penalty(a, b, kind=kind) for kind in KL_KINDS}, use_jit)(logp, ref)
    for kind in KL_KINDS:
        assert results[kind].dtype == precision.dtype
        np.testing.assert_allclose(results[kind], np_kl(logp, ref, kind), **precision.tol, err_msg=kind)


@pytest.mark.parametrize("shape", [(3, 7), LARGEST])
def test_kl_penalty_gradients_match_analytic(x64, shape):
    logp, ref = (jnp.asarray(a) for a in kl_batch(np.random.default_rng(7), shape))
    grads = jit(lambda a: {kind: jax.grad(lambda x: losses.kl_penalty(x, ref, kind=kind).sum())(a)
                               for kind in KL_KINDS})(logp)
    np.testing.assert_allclose(grads["k1"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(grads["k2"], f64(logp) - f64(ref), rtol=1e-6, atol=1e-12)
    expected = np_k3_grad(logp, ref)
    assert (expected == 0).any() and (expected != 0).any()  # both the clamped and the free region are checked
    np.testing.assert_allclose(grads["k3"], expected, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError):
        losses.kl_penalty(logp, ref, kind="k4")


# ---------------------------------------------------------------- policy_gradient_loss

CLIPS = [(0.2, 0.28), (None, None), (0.1, None), (None, 0.3)]
# Aggregation does not interact with the clip band: every band with "token", two with "sequence".
LOSS_CONFIGS = [("token", low, high) for low, high in CLIPS] + [("sequence", low, high) for low, high in CLIPS[:2]]


def loss_inputs(rng, shape, per_token_advantages=False):
    """(logp, old_logp, advantages, mask, is_weights, ref_logp) as NumPy float64 (mask bool)."""
    logp, old = token_batch(rng, shape)
    adv = rng.standard_normal(shape if per_token_advantages else shape[:1])
    weights = rng.uniform(0.0, 2.0, shape)
    ref = logp + rng.standard_normal(shape)
    return logp, old, adv, random_mask(rng, shape), weights, ref


def loss_with_kl(logp, old, adv, mask, weights, ref, aggregation="token", clip_low=0.2, clip_high=0.28,
                 num_tokens=None):
    return losses.policy_gradient_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                       aggregation=aggregation, num_tokens=num_tokens, is_weights=weights,
                                       kl=losses.kl_penalty(logp, ref), kl_coef=0.05)


@pytest.mark.parametrize("precision, shape, use_jit", PRECISION_RUNS, indirect=["precision"])
def test_policy_gradient_loss_matches_numpy(precision, shape, use_jit):
    rng = np.random.default_rng(shape[0] + 100 * shape[1])
    logp, old, adv, mask, weights, ref = loss_inputs(rng, shape, per_token_advantages=shape[0] % 2 == 0)
    logp, old, adv, weights, ref = precision.cast(logp, old, adv, weights, ref)

    def every_config(*args):
        return {f"{agg}-{low}-{high}": loss_with_kl(*args, aggregation=agg, clip_low=low, clip_high=high)
                for agg, low, high in LOSS_CONFIGS}

    results = maybe_jit(every_config, use_jit)(logp, old, adv, mask, weights, ref)
    for agg, low, high in LOSS_CONFIGS:
        loss, metrics = results[f"{agg}-{low}-{high}"]
        expected, expected_metrics = np_policy_loss(logp, old, adv, mask, low, high, agg, is_weights=weights,
                                                    kl=np_kl(logp, ref, "k3"), kl_coef=0.05)
        config = f"aggregation={agg} clip=({low}, {high})"
        assert loss.shape == () and loss.dtype == precision.dtype
        np.testing.assert_allclose(loss, expected, **precision.tol, err_msg=config)
        assert set(metrics) == set(expected_metrics)
        for name, value in metrics.items():
            np.testing.assert_allclose(value, expected_metrics[name], **precision.tol, err_msg=f"{config} {name}")
        if shape == LARGEST and low is not None:
            assert 0 < metrics["clip_fraction"] < 1, config  # some tokens are clipped, some are not


@pytest.mark.parametrize("shape", [(3, 7), (4, 16)])
def test_policy_gradient_loss_gradient_matches_finite_differences(x64, shape):
    logp, old, adv, mask, weights, ref = loss_inputs(np.random.default_rng(shape[1]), shape, True)
    configs = LOSS_CONFIGS[:2] + LOSS_CONFIGS[4:]  # both aggregations, clipped and unclipped

    @jit
    def every_gradient(logp):
        return {f"{agg}-{low}-{high}": jax.grad(lambda x: loss_with_kl(x, old, adv, mask, weights, ref, agg, low,
                                                                       high)[0])(logp)
                for agg, low, high in configs}

    grads = every_gradient(jnp.asarray(logp))
    for agg, low, high in configs:
        def numpy_loss(x):
            return np_policy_loss(x, old, adv, mask, low, high, agg, is_weights=weights, kl=np_kl(x, ref, "k3"),
                                  kl_coef=0.05)[0]

        np.testing.assert_allclose(grads[f"{agg}-{low}-{high}"], finite_difference(numpy_loss, logp), rtol=1e-6,
                                   atol=1e-9, err_msg=f"aggregation={agg} clip=({low}, {high})")


@pytest.mark.parametrize("shape", [(1, 1), LARGEST])
def test_reinforce_form_has_the_analytic_gradient(x64, shape):
    # old_logp = stop_gradient(logp): ρ = 1 in value, ∇ρ = ∇logp, so ∇ℓ = −w·A·∇logp whatever the clip band.
    logp, _, adv, mask, weights, _ = loss_inputs(np.random.default_rng(3), shape)

    @jit
    def value_and_grads(logp):
        return {agg: jax.value_and_grad(lambda x: losses.policy_gradient_loss(
            x, jax.lax.stop_gradient(x), adv, mask, aggregation=agg, is_weights=weights)[0])(logp)
            for agg in ("token", "sequence")}

    results = value_and_grads(jnp.asarray(logp))
    per_token = -weights * adv[:, None]
    rows_with_tokens = max((mask.sum(axis=1) > 0).sum(), 1)
    scales = {"token": mask / max(mask.sum(), 1),
              "sequence": mask / np.maximum(mask.sum(axis=1, keepdims=True), 1) / rows_with_tokens}
    for agg, scale in scales.items():
        value, grad = results[agg]
        np.testing.assert_allclose(value, (per_token * scale).sum(), rtol=1e-6, atol=1e-12, err_msg=agg)
        np.testing.assert_allclose(grad, per_token * scale, rtol=1e-6, atol=1e-12, err_msg=agg)


def test_micro_batches_with_the_global_token_count_add_up():
    shape = LARGEST
    logp, old, adv, mask, weights, ref = loss_inputs(np.random.default_rng(11), shape)
    logp, old, adv, weights, ref = (np.float32(a) for a in (logp, old, adv, weights, ref))
    num_tokens = np.float32(mask.sum())
    loss_and_grad = jit(jax.value_and_grad(lambda x, *rest, num_tokens=None: loss_with_kl(
        x, *rest, num_tokens=num_tokens)[0]))

    full, full_grad = loss_and_grad(logp, old, adv, mask, weights, ref)
    # Two micro-batches, the first holding the empty row: each divides by the global count, not its own.
    parts = [loss_and_grad(*(a[rows] for a in (logp, old, adv, mask, weights, ref)), num_tokens=num_tokens)
             for rows in (slice(None, 4), slice(4, None))]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([parts[0][1], parts[1][1]]), full_grad, rtol=1e-5, atol=1e-8)


def test_policy_gradient_loss_edge_cases():
    logp, old, adv, mask, _, _ = loss_inputs(np.random.default_rng(5), (4, 9))
    logp, old, adv = (np.float32(a) for a in (logp, old, adv))
    empty = np.zeros_like(mask)

    @jit
    def cases(logp, old, adv):
        def loss(x, o, a, w, token_mask, agg="token"):
            return losses.policy_gradient_loss(x, o, a, token_mask, aggregation=agg, is_weights=w)

        grad_all = jax.grad(lambda *args: loss(*args, mask)[0], argnums=(0, 1, 2, 3))
        return {
            "per_sequence_adv": loss(logp, old, adv, None, mask),
            "per_token_adv_float_mask": loss(logp, old, jnp.broadcast_to(adv[:, None], logp.shape), None,
                                             mask.astype(np.float32)),
            "grads": grad_all(logp, old, adv, jnp.ones_like(logp)),
            "metric_grad": jax.grad(lambda x: sum(loss(x, old, adv, None, mask)[1].values()))(logp),
            "empty": {agg: jax.value_and_grad(lambda x: loss(x, old, adv, None, empty, agg), has_aux=True)(logp)
                      for agg in ("token", "sequence")},
        }

    results = cases(logp, old, adv)
    # advantages [B] broadcast over T, and a float mask, give what [B, T] advantages and a bool mask give.
    for a, b in zip(jax.tree.leaves(results["per_sequence_adv"]), jax.tree.leaves(results["per_token_adv_float_mask"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Only logp carries a gradient: old_logp, advantages and is_weights are constants, metrics carry none.
    assert np.abs(results["grads"][0]).sum() > 0
    for grad in results["grads"][1:] + (results["metric_grad"],):
        np.testing.assert_array_equal(grad, 0.0)
    # No token at all: zero loss, zero metrics, zero gradient, no NaN.
    for agg, ((loss, metrics), grad) in results["empty"].items():
        assert loss == 0 and all(value == 0 for value in metrics.values()), agg
        np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError):
        losses.policy_gradient_loss(logp, old, adv, mask, aggregation="batch")
    with pytest.raises(ValueError):
        losses.policy_gradient_loss(logp, old, adv, mask, aggregation="sequence", num_tokens=4)


# ---------------------------------------------------------------- MOPD


@pytest.mark.parametrize("shape", [(1, 1), LARGEST])
def test_mopd_advantages_and_reinforce_gradient(x64, shape):
    rng = np.random.default_rng(17)
    logp, teacher = (jnp.asarray(a) for a in token_batch(rng, shape, spread=1.0))
    mask = random_mask(rng, shape)

    @jit
    def advantages_and_grad(teacher, logp):
        def loss(x):
            adv = losses.mopd_advantages(teacher, x, mask)
            return losses.policy_gradient_loss(x, jax.lax.stop_gradient(x), adv, mask, clip_low=None,
                                               clip_high=None)[0]
        return losses.mopd_advantages(teacher, logp, mask), jax.grad(loss)(logp)

    advantages, grad = advantages_and_grad(teacher, logp)
    expected = np.where(mask, f64(teacher) - f64(logp), 0)
    np.testing.assert_allclose(advantages, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(losses.mopd_advantages(teacher, logp, mask), expected, rtol=1e-6, atol=1e-12)
    # The advantage is a constant: ∇ = −(teacher − logp)·mask / Σ mask, the reverse-KL gradient.
    np.testing.assert_allclose(grad, -expected / max(mask.sum(), 1), rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- per-sample masks


@pytest.mark.parametrize("group_size, use_jit", [(1, True), (2, False), (2, True), (4, True)])
def test_dynamic_filter_and_group_all_equal(group_size, use_jit):
    rng = np.random.default_rng(group_size)
    rewards = (rng.random(8 * group_size) < 0.5).astype(np.float32)
    rewards[:group_size] = 1.0  # an all-correct group
    rewards[group_size:2 * group_size] = 0.0  # an all-wrong group
    if group_size > 1:
        rewards[2 * group_size:3 * group_size] = np.arange(group_size) % 2  # a mixed group
    all_equal = np.array([np.unique(g).size == 1 for g in rewards.reshape(-1, group_size)])
    fn = maybe_jit(lambda r: (losses.dynamic_filter(r, group_size), losses.group_all_equal(r, group_size)), use_jit)
    keep, equal = fn(rewards)
    assert keep.dtype == bool and keep.shape == rewards.shape
    np.testing.assert_array_equal(keep, np.repeat(~all_equal, group_size))
    np.testing.assert_array_equal(equal, all_equal)


@pytest.mark.parametrize("use_jit", [False, True])
def test_overlong_rewards_and_mask(use_jit):
    rng = np.random.default_rng(0)
    rewards = rng.random(12).astype(np.float32)
    truncated = rng.random(12) < 0.4
    policies = ["filter", "penalty", "none"]
    fn = maybe_jit(lambda r, t: {p: losses.overlong_rewards_and_mask(r, t, p) for p in policies}, use_jit)
    results = fn(rewards, truncated)
    for policy in policies:
        used, sample_mask = results[policy]
        expected_rewards = np.where(truncated, 0, rewards) if policy == "penalty" else rewards
        expected_mask = np.where(truncated, 0, 1) if policy == "filter" else np.ones(12)
        assert sample_mask.dtype == jnp.float32
        np.testing.assert_array_equal(used, expected_rewards, err_msg=policy)
        np.testing.assert_array_equal(sample_mask, expected_mask, err_msg=policy)
    with pytest.raises(ValueError):
        losses.overlong_rewards_and_mask(rewards, truncated, "clip")


@pytest.mark.parametrize("shape, use_jit", RUNS)
def test_mismatch_sequence_mask(shape, use_jit):
    rng = np.random.default_rng(shape[0] + shape[1])
    train, inf = token_batch(rng, shape, spread=0.2)
    inf[1::2] += 0.5 * rng.random(inf[1::2].shape)  # some sequences drift well past the threshold
    mask = random_mask(rng, shape)
    inf[~mask] = -np.inf  # padding may hold anything; it must not matter
    train, inf = np.float32(train), np.float32(inf)
    threshold = 1.15
    fn = maybe_jit(lambda a, b, m: losses.mismatch_sequence_mask(a, b, m, threshold), use_jit)
    result = fn(train, inf, mask)
    expected = np.ones(shape[0])
    for b in range(shape[0]):
        if mask[b].any() and np.exp(np.abs(f64(train[b]) - f64(inf[b])))[mask[b]].mean() > threshold:
            expected[b] = 0
    assert result.dtype == jnp.float32
    np.testing.assert_array_equal(result, expected)
    if shape == LARGEST:
        assert expected.min() == 0 and expected.max() == 1
    np.testing.assert_array_equal(losses.mismatch_sequence_mask(train, inf, mask, None), 1.0)


@pytest.mark.parametrize("group_size, use_jit", [(1, True), (3, False), (3, True)])
def test_group_max_mask(group_size, use_jit):
    rng = np.random.default_rng(group_size)
    rewards = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], 6 * group_size, p=[0.4, 0.2, 0.2, 0.1, 0.1]).astype(np.float32)
    rewards[:group_size] = 0.5  # the boundary: max ≤ threshold is masked
    result = maybe_jit(lambda r: losses.group_max_mask(r, group_size, 0.5), use_jit)(rewards)
    expected = np.repeat([float(g.max() > 0.5) for g in rewards.reshape(-1, group_size)], group_size)
    assert result.dtype == jnp.float32 and np.asarray(result)[0] == 0
    np.testing.assert_array_equal(result, expected)
