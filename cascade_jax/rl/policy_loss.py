"""The GRPO / MOPD train-step loss: `loss_fn(model, micro_batch) -> (sum, (count, aux))` for `train_step`.

Per token ℓ = −w · A · ρ with ρ = exp(logp − sg(logp)) (= 1 in value: strictly on-policy, one update per
rollout batch) and w the train/inference importance weight (`losses.importance_weights` of the training
log-probs against the sampler's), plus kl_coef · KL against a reference when given. The step divides the
sum by the loss tokens of the whole batch, so the loss is the token-level mean over the global batch.

A micro-batch holds the packed rows (`tokens`, `targets`, `segment_ids`), `loss_mask` (response tokens ×
the per-sequence sample mask), `advantages` and `inf_logp` per token, and `ref_logp` when kl_coef > 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cascade_jax.rl import losses
from cascade_jax.rl.logprobs import SamplingFilter, sequence_log_probs


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    sampling: SamplingFilter = SamplingFilter()
    importance: str = "icepop"          # icepop | tis | none
    importance_low: float = 0.5
    importance_high: float = 2.0
    clip_low: float | None = 0.2        # inactive when on-policy (ρ = 1); kept for the general form
    clip_high: float | None = 0.28
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    chunk_size: int = 512

    def __call__(self, model, micro_batch):
        logp, out = sequence_log_probs(model, micro_batch["tokens"], micro_batch["targets"],
                                       micro_batch["segment_ids"], self.sampling, self.chunk_size)
        # A sampled token the trainer's top-p set leaves out has logp = −inf: it carries no weight.
        mask = (micro_batch["loss_mask"] > 0) & jnp.isfinite(logp)
        logp = jnp.where(mask, logp, 0.0)
        weights = losses.importance_weights(logp, micro_batch["inf_logp"], mask, mode=self.importance,
                                            low=self.importance_low, high=self.importance_high)
        kl = None
        if self.kl_coef:
            kl = jnp.where(mask, losses.kl_penalty(logp, micro_batch["ref_logp"], kind=self.kl_kind), 0.0)
        total, metrics = losses.policy_gradient_loss(
            logp, jax.lax.stop_gradient(logp), micro_batch["advantages"], mask, clip_low=self.clip_low,
            clip_high=self.clip_high, aggregation="token", num_tokens=1.0, is_weights=weights, kl=kl,
            kl_coef=self.kl_coef)
        count = jnp.sum(mask, dtype=jnp.float32)
        masked = mask.astype(jnp.float32)
        aux = {   # sums over tokens; the task divides by the batch's token count
            "clip_tokens": metrics["clip_fraction"] * count,
            "is_weight_sum": jnp.sum(weights * masked),
            "is_zeroed_tokens": jnp.sum((weights == 0) * masked),
            "kl_sum": metrics["kl_mean"] * count,
            "dropped_tokens": jnp.zeros((), jnp.int32) if out.dropped_tokens is None else out.dropped_tokens,
        }
        if out.expert_load is not None:
            aux["expert_load"] = out.expert_load
        return total, (count, aux)
