"""GRPO / MOPD loss pieces as pure, jit-able JAX functions on `[B, T]` token arrays and `[N*G]` sample arrays.

Convention: `mask` (bool or float) is 1 on a response token that counts in the loss: it is the token loss mask
times the per-sample mask (dynamic filtering, overlong filtering, mismatch and group-max masks), so every
function here needs only the one mask. Rewards and per-sample masks are flat `[N*G]` in group order (the G
samples of a prompt are consecutive). Results are float32, or float64 when float64 inputs come in under x64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

# k3 = exp(d) - d - 1 overflows for large d; both clamps are those of verl's low_var_kl.
_K3_LOG_RATIO_CLAMP = 20.0
_K3_MAX = 10.0

_IS_MODES = ("icepop", "tis", "none")
_KL_KINDS = ("k1", "k2", "k3")
_AGGREGATIONS = ("token", "sequence")
_OVERLONG_POLICIES = ("filter", "penalty", "none")


def _float_dtype(*arrays) -> jnp.dtype:
    """float32 at least (ints, bools and bf16 are promoted); float64 inputs stay float64 so fp64 tests are exact."""
    return jnp.result_type(*arrays, jnp.float32)


def _safe_denominator(count: Array) -> Array:
    """count where positive, else 1: an empty sum over nothing then gives 0, never 0/0 (nor a NaN gradient)."""
    return jnp.where(count > 0, count, 1)


def _masked_mean(values: Array, weights: Array) -> Array:
    """Σ values·weights / Σ weights (0 when nothing is weighted); `where` keeps garbage at masked slots out."""
    total = jnp.where(weights != 0, values * weights, 0).sum()
    return total / _safe_denominator(weights.sum())


def _reshape_groups(rewards: Float[Array, "NG"], group_size: int) -> Float[Array, "N G"]:
    rewards = jnp.asarray(rewards)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} are not a flat [N*G] array with group_size={group_size}")
    return rewards.astype(_float_dtype(rewards)).reshape(-1, group_size)


def group_all_equal(rewards: Float[Array, "NG"], group_size: int) -> Bool[Array, "N"]:
    """Per group: max == min of its rewards (an exact test, unlike std == 0 after rounding)."""
    groups = _reshape_groups(rewards, group_size)
    return groups.max(axis=1) == groups.min(axis=1)


def group_advantages(
    rewards: Float[Array, "NG"],
    group_size: int,
    *,
    leave_one_out: bool = False,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Float[Array, "NG"]:
    """GRPO advantages per sample, groups of `group_size` consecutive rewards.

    Plain:          A_i = (r_i − mean_g) / (std_g + eps), std with ddof 0.
    leave_one_out:  A_i = (r_i − (Σ_g r − r_i)/(G − 1)) / (std_g + eps), std with ddof 1 (as NeMo-RL).
    normalize_std=False drops the division. A group whose rewards are all equal gives exactly 0.
    """
    groups = _reshape_groups(rewards, group_size)
    if leave_one_out and group_size < 2:
        raise ValueError("leave_one_out needs group_size >= 2 (the baseline is the mean of the other samples)")
    if leave_one_out:
        baseline = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
        std = groups.std(axis=1, ddof=1, keepdims=True)
    else:
        baseline = groups.mean(axis=1, keepdims=True)
        std = groups.std(axis=1, keepdims=True)
    advantages = groups - baseline
    if normalize_std:
        advantages = advantages / (std + eps)
    # Rounding leaves r − mean ~1e-17 for equal rewards (0.1 + 0.1 + 0.1 != 0.3); such groups carry no signal.
    all_equal = (groups.max(axis=1) == groups.min(axis=1))[:, None]
    return jnp.where(all_equal, 0, advantages).reshape(-1)


def importance_weights(
    train_logp: Float[Array, "B T"],
    inf_logp: Float[Array, "B T"],
    mask: Float[Array, "B T"] | Bool[Array, "B T"],
    *,
    mode: str = "icepop",
    low: float = 0.5,
    high: float = 2.0,
) -> Float[Array, "B T"]:
    """Training-vs-inference mismatch weights per token, with no gradient.

    r = exp(train_logp − inf_logp);  icepop: r if low ≤ r ≤ high else 0;  tis: clip(r, low, high);  none: 1.
    0 wherever mask is 0.
    """
    if mode not in _IS_MODES:
        raise ValueError(f"unknown importance-weight mode {mode!r}; expected one of {_IS_MODES}")
    dtype = _float_dtype(train_logp, inf_logp)
    ratio = jnp.exp(train_logp.astype(dtype) - inf_logp.astype(dtype))
    if mode == "icepop":
        weights = jnp.where((ratio >= low) & (ratio <= high), ratio, 0)
    elif mode == "tis":
        weights = jnp.clip(ratio, low, high)
    else:
        weights = jnp.ones_like(ratio)
    return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) != 0, weights, 0).astype(dtype))


def kl_penalty(logp: Float[Array, "B T"], ref_logp: Float[Array, "B T"], *, kind: str = "k3") -> Float[Array, "B T"]:
    """Per-token KL(π ‖ π_ref) estimate, differentiable in `logp`.

    k1 = logp − ref;  k2 = ½(logp − ref)²;  k3 = min(exp(d) − d − 1, 10) with d = clip(ref − logp, −20, 20).
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {_KL_KINDS}")
    dtype = _float_dtype(logp, ref_logp)
    log_ratio = logp.astype(dtype) - ref_logp.astype(dtype)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    d = jnp.clip(-log_ratio, -_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return jnp.minimum(jnp.exp(d) - d - 1, _K3_MAX)


def _aggregate(per_token: Array, weights: Array, aggregation: str, num_tokens) -> Array:
    masked = jnp.where(weights != 0, per_token * weights, 0)
    if aggregation == "token":
        count = weights.sum() if num_tokens is None else jnp.asarray(num_tokens, per_token.dtype)
        return masked.sum() / _safe_denominator(count)
    row_counts = weights.sum(axis=1)
    row_means = masked.sum(axis=1) / _safe_denominator(row_counts)
    has_tokens = row_counts > 0
    return jnp.where(has_tokens, row_means, 0).sum() / _safe_denominator(has_tokens.sum())


def policy_gradient_loss(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B"] | Float[Array, "B T"],
    mask: Float[Array, "B T"] | Bool[Array, "B T"],
    *,
    clip_low: float | None = 0.2,
    clip_high: float | None = 0.28,
    aggregation: str = "token",
    num_tokens: int | Float[Array, ""] | None = None,
    is_weights: Float[Array, "B T"] | None = None,
    kl: Float[Array, "B T"] | None = None,
    kl_coef: float = 0.0,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped-surrogate (PPO/GRPO, DAPO clip-higher) loss; REINFORCE when old_logp = stop_gradient(logp).

    ℓ = −w · min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A) + kl_coef · kl,  ρ = exp(logp − old_logp).
    A `None` clip bound leaves that side unclipped (both None: ℓ = −w·ρ·A, MOPD). `old_logp`, `advantages`
    and `is_weights` (w, default 1) are constants: no gradient flows into them; `kl` keeps its gradient.
    token:    loss = Σ ℓ·mask / num_tokens (default Σ mask; pass the global count when micro-batching).
    sequence: loss = mean over rows with a token of Σ_t ℓ·mask / Σ_t mask.
    An empty sum gives 0. Metrics (masked-token means, no gradient): clip_fraction (the clipped term is
    strictly the smaller), ratio_mean, advantage_abs_mean, kl_mean.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {_AGGREGATIONS}")
    if aggregation == "sequence" and num_tokens is not None:
        raise ValueError("num_tokens applies to aggregation='token' only")
    dtype = _float_dtype(logp, old_logp, advantages)
    logp = logp.astype(dtype)
    old_logp = jax.lax.stop_gradient(old_logp.astype(dtype))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, dtype))
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.broadcast_to(advantages, logp.shape)
    weights = jnp.asarray(mask).astype(dtype)
    is_weights = 1 if is_weights is None else jax.lax.stop_gradient(is_weights.astype(dtype))

    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    lower = -jnp.inf if clip_low is None else 1 - clip_low
    upper = jnp.inf if clip_high is None else 1 + clip_high
    clipped = jnp.clip(ratio, lower, upper) * advantages
    per_token = -is_weights * jnp.minimum(unclipped, clipped)
    if kl is not None:
        per_token = per_token + kl_coef * kl.astype(dtype)
    loss = _aggregate(per_token, weights, aggregation, num_tokens)

    metrics = {
        "clip_fraction": _masked_mean((clipped < unclipped).astype(dtype), weights),
        "ratio_mean": _masked_mean(ratio, weights),
        "advantage_abs_mean": _masked_mean(jnp.abs(advantages), weights),
        "kl_mean": jnp.zeros((), dtype) if kl is None else _masked_mean(kl.astype(dtype), weights),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def mopd_advantages(
    teacher_logp: Float[Array, "B T"],
    train_logp: Float[Array, "B T"],
    mask: Float[Array, "B T"] | Bool[Array, "B T"],
) -> Float[Array, "B T"]:
    """On-policy distillation advantage per sampled token: A = teacher_logp − train_logp (0 where masked).

    A constant (stop_gradient): with policy_gradient_loss(..., clip_low=None, clip_high=None) and
    old_logp = stop_gradient(logp) the gradient is −A·∇logp, the reverse-KL policy gradient.
    """
    dtype = _float_dtype(teacher_logp, train_logp)
    advantage = teacher_logp.astype(dtype) - train_logp.astype(dtype)
    return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) != 0, advantage, 0))


def dynamic_filter(rewards: Float[Array, "NG"], group_size: int) -> Bool[Array, "NG"]:
    """Keep-mask per sample (DAPO dynamic sampling): False for every member of a group whose rewards all equal."""
    return jnp.repeat(~group_all_equal(rewards, group_size), group_size)


def overlong_rewards_and_mask(
    rewards: Float[Array, "NG"], truncated: Bool[Array, "NG"], policy: str
) -> tuple[Float[Array, "NG"], Float[Array, "NG"]]:
    """(rewards for the advantages, sample mask) for truncated (overlong) samples.

    filter:  rewards unchanged (the truncated sample still counts in its group's baseline), mask 0 on truncated.
    penalty: reward 0 on truncated, mask 1.   none: unchanged, mask 1.
    """
    if policy not in _OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong policy {policy!r}; expected one of {_OVERLONG_POLICIES}")
    rewards = jnp.asarray(rewards)
    rewards = rewards.astype(_float_dtype(rewards))
    truncated = jnp.asarray(truncated).astype(bool)
    if policy == "filter":
        return rewards, jnp.where(truncated, 0, 1).astype(jnp.float32)
    if policy == "penalty":
        rewards = jnp.where(truncated, 0, rewards)
    return rewards, jnp.ones(rewards.shape, jnp.float32)


def mismatch_sequence_mask(
    train_logp: Float[Array, "B T"],
    inf_logp: Float[Array, "B T"],
    mask: Float[Array, "B T"] | Bool[Array, "B T"],
    threshold: float | None,
) -> Float[Array, "B"]:
    """Per sequence: 0 if mean over its tokens of exp(|train_logp − inf_logp|) > threshold, else 1 (no gradient).

    NeMo-RL's seq_logprob_error_threshold. A row with no tokens, or threshold None, gives 1.
    """
    if threshold is None:
        return jnp.ones(train_logp.shape[:1], jnp.float32)
    dtype = _float_dtype(train_logp, inf_logp)
    weights = jnp.asarray(mask).astype(dtype)
    # Zero the gap before exp: padding may hold arbitrary log-probs, and exp of them must not reach inf·0.
    gap = jnp.where(weights != 0, jnp.abs(train_logp.astype(dtype) - inf_logp.astype(dtype)), 0)
    row_counts = weights.sum(axis=1)
    row_error = (jnp.exp(gap) * weights).sum(axis=1) / _safe_denominator(row_counts)
    too_far = (row_counts > 0) & (row_error > threshold)
    return jax.lax.stop_gradient(jnp.where(too_far, 0, 1).astype(jnp.float32))


def group_max_mask(rewards: Float[Array, "NG"], group_size: int, threshold: float) -> Float[Array, "NG"]:
    """Per sample: 0 for every member of a group whose max reward ≤ threshold, else 1 (agentless-SWE rule)."""
    groups = _reshape_groups(rewards, group_size)
    keep = groups.max(axis=1) > threshold
    return jnp.repeat(keep, group_size).astype(jnp.float32)
