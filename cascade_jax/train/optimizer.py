"""The optax optimizer of a run: global-norm clipping, AdamW on a warm-up + cosine schedule.

Weight decay applies to matrices only (not norms, biases or the per-head Mamba vectors); a frozen
router receives no updates at all.
"""

from __future__ import annotations

import jax
import optax

from cascade_jax.train.config import OptimizerSection


def learning_rate_schedule(cfg: OptimizerSection, total_steps: int) -> optax.Schedule:
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.min_lr)


def _is_router(path) -> bool:
    return any(getattr(key, "key", None) == "router" for key in path)


def build_optimizer(cfg: OptimizerSection, total_steps: int) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    chain = []
    if cfg.clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*chain)
    if cfg.freeze_router:
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "frozen" if _is_router(path) else "trained", params)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
