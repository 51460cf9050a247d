"""One GRPO stage on the shared `TrainLoop`: prompts → G rollouts each → rewards → advantages and filters →
one optimizer step per rollout batch → metrics and checkpoints.

Each step, on the current weights:
1. rollouts: the step's prompts (`RLPrompts`), each sampled G times by the slot engine (one prefill per
   prompt), with seeds fixed by (train.seed, step, prompt) so a resumed step samples what it sampled before;
2. rewards in worker processes (`RewardPool`; a reward that fails or times out gives 0 and is counted);
3. overlong policy, group advantages, dynamic filtering (training.md §2.1, §2.6);
4. the rollouts packed into rows, and one no-gradient pass for the training log-probs: sequences whose
   train/inference mismatch is too large are masked, the rest get importance weights in the loss;
5. `train_step` with `PolicyLoss` over micro-batches, normalised by the global count of loss tokens.

The run directory follows the checkpoint contract of SFT (config.yaml, cascade_config.json,
checkpoints/<step>, metrics.jsonl, tensorboard/, complete.json), so a GRPO result loads, exports and
starts the next stage like any other checkpoint.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.data import RLPrompts
from cascade_jax.inference import Engine, SamplingParams, generate
from cascade_jax.inference.engine import prompt_width
from cascade_jax.rl import losses
from cascade_jax.rl.config import RLConfig
from cascade_jax.rl.judge_eval import JudgeWinRate
from cascade_jax.rl.logprobs import SamplingFilter, micro_batched_log_probs
from cascade_jax.rl.packing import micro_batches, pack_rollouts, per_sequence_mean, per_token
from cascade_jax.rl.policy_loss import PolicyLoss
from cascade_jax.rl.stage_rewards import StageRewards
from cascade_jax.rl.teachers import Teachers
from cascade_jax.train.evaluation import TaskAccuracy, read_task_prompts
from cascade_jax.train.loop import Evaluation, LoopResult, TrainLoop
from cascade_jax.train.optimizer import build_optimizer, learning_rate_schedule
from cascade_jax.train.setup import check_resume, initial_state, run_record
from cascade_jax.train.step import train_step

SEEDS_PER_STEP = 1 << 16   # room for the prompts of one step in the sampling-seed space


class GRPOTask:
    """The GRPO side of the loop. `next_batch` generates and scores on the current weights; `train` steps."""

    def __init__(self, cfg: RLConfig, prompts: RLPrompts, graphdef, tx, rewards: StageRewards, reference=None,
                 teachers: Teachers | None = None):
        self.cfg, self.prompts, self.iterator = cfg, prompts, iter(prompts)
        self.graphdef, self.tx, self.rewards, self.reference = graphdef, tx, rewards, reference
        self.teachers = teachers
        self.tokenizer = prompts.tokenizer
        r, g = cfg.rollout, cfg.grpo
        self.group_size = cfg.prompts.group_size
        self.sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       top_k=r.top_k, stop_token_ids=(self.tokenizer.eos_id,), n=self.group_size)
        self.filter = SamplingFilter(r.temperature, r.top_k, r.top_p)
        # MOPD is REINFORCE-form (no clipping, no KL, training.md §3.2); GRPO keeps the clip bounds, inactive
        # when strictly on-policy.
        clip = dict(clip_low=None, clip_high=None) if teachers is not None else {}
        self.loss_fn = PolicyLoss(self.filter, g.importance_weights, g.importance_low, g.importance_high,
                                  kl_coef=g.kl_coef, kl_kind=g.kl_kind, chunk_size=cfg.train.loss_chunk_size, **clip)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.engine: Engine | None = None

    # ------------------------------------------------------------------ rollouts and rewards
    def _engine(self, model) -> Engine:
        if self.engine is None:
            r = self.cfg.rollout
            slots = min(r.max_slots, self.cfg.prompts.prompts_per_step * self.group_size)
            self.engine = Engine(model, max_slots=slots, sync_every=r.sync_every,
                                 max_len=prompt_width(self.cfg.prompts.max_prompt_len) + r.max_new_tokens)
        return self.engine

    def next_batch(self, state, step: int) -> dict:
        group = next(self.iterator)
        G = self.group_size
        clock = {"start": time.perf_counter()}
        model = nnx.merge(self.graphdef, state.params, state.expert_bias)
        prompts = [list(map(int, p)) for p in group["prompt_tokens"][::G]]
        seed = (self.cfg.train.seed * 1_000_003 + step) * SEEDS_PER_STEP
        completions = generate(model, prompts, self.sampling, seed=seed, engine=self._engine(model))
        clock["rollout"] = time.perf_counter()

        texts = [self.tokenizer.decode(c.tokens, skip_special_tokens=False) for c in completions]
        metas = [{**meta, "prompt_text": _prompt_text(messages)} for meta, messages in
                 zip(group["meta"], group["messages"])]
        rewards, counts = self.rewards.score(texts, metas)
        clock["reward"] = time.perf_counter()

        batch, metrics = self._assemble(state, group, completions, rewards, metas)
        clock["logprob"] = time.perf_counter()
        metrics.update({f"reward_{k}": float(v) for k, v in counts.items() if k != "ok"})
        metrics.update(rollout_s=clock["rollout"] - clock["start"], reward_s=clock["reward"] - clock["rollout"],
                       logprob_s=clock["logprob"] - clock["reward"])
        return {"arrays": batch, "metrics": metrics}

    def _assemble(self, state, group, completions, rewards, metas) -> tuple[dict, dict]:
        g, G = self.cfg.grpo, self.group_size
        truncated = np.asarray([c.finish_reason == "length" for c in completions])
        used, sample_mask = jax.device_get(losses.overlong_rewards_and_mask(rewards, truncated, g.overlong))
        advantages = np.asarray(losses.group_advantages(used, G, leave_one_out=g.leave_one_out,
                                                        normalize_std=g.normalize_std))
        keep = np.asarray(losses.dynamic_filter(used, G)) if g.dynamic_filter else np.ones(len(used), bool)
        sample_mask = np.asarray(sample_mask) * keep
        if g.group_max_mask is not None:
            sample_mask = sample_mask * np.asarray(losses.group_max_mask(used, G, g.group_max_mask))

        prompts = [list(map(int, p)) for p in group["prompt_tokens"]]
        rows = pack_rollouts(prompts, [c.tokens for c in completions], [c.logprobs for c in completions],
                             self.cfg.train.row_len)
        rows["response_mask"] = rows["loss_mask"].copy()
        rows["loss_mask"] *= per_token(sample_mask, rows["sequence"])
        rows["advantages"] = per_token(advantages, rows["sequence"])
        batch = micro_batches(rows, self.cfg.train.rows_per_micro_batch)

        # The training log-probs of every response token, before the update (same weights as the sampler's).
        scoring = dict(batch, loss_mask=batch.pop("response_mask"))
        count = len(completions)
        seq, resp = batch["sequence"], scoring["loss_mask"]
        metrics = {}
        if g.train_logprobs:
            train_logp = np.asarray(micro_batched_log_probs(state.params, state.expert_bias, scoring,
                                                            graphdef=self.graphdef, sampling=self.filter))
            error = np.where(resp > 0, np.abs(train_logp - batch["inf_logp"]), 0.0)
            seq_error = per_sequence_mean(np.exp(error), seq, resp, count)
            mismatch_ok = (seq_error <= g.mismatch_threshold) if g.mismatch_threshold else np.ones(count, bool)
            batch["loss_mask"] = batch["loss_mask"] * per_token(mismatch_ok, seq)
            metrics.update(masked_sequences=float((~mismatch_ok).sum()),
                           logprob_error_mean=float(error.sum() / max(resp.sum(), 1.0)),
                           logprob_error_max=float(error.max()))
        if self.teachers is not None:
            if not g.train_logprobs:   # the config refuses this; never let the advantage become log π_teacher alone
                raise RuntimeError("MOPD needs the trainer's log-probs of the sampled tokens")
            metrics.update(self._distillation_advantages(batch, scoring, train_logp, metas))
        if g.kl_coef:
            batch["ref_logp"] = np.asarray(micro_batched_log_probs(*self.reference, scoring, graphdef=self.graphdef,
                                                                   sampling=self.filter))
        lengths = np.asarray([len(c.tokens) for c in completions], np.float32)
        metrics.update({
            "reward_mean": float(rewards.mean()), "pass_rate": float(np.mean(rewards >= 1.0)),
            "response_length": float(lengths.mean()), "response_length_max": float(lengths.max()),
            "truncation_rate": float(truncated.mean()),
            "repetition": float(np.mean([repetition(c.tokens) for c in completions])),
            "filtered_groups": float((~keep.reshape(-1, G)[:, 0]).sum()),
            "entropy": float(-(batch["inf_logp"] * resp).sum() / max(resp.sum(), 1.0)),
        })
        batch.pop("sequence")
        return batch, metrics

    def _distillation_advantages(self, batch, scoring, train_logp, metas) -> dict[str, float]:
        """MOPD (training.md §3.2 Eq. 2): per token A = log π_teacher − log π_train, the trainer's log-probs
        before the update; with mopd.outcome_weight, plus that times the GRPO advantage (MiMo's variant)."""
        sequence_teacher = self.teachers.route(metas)
        teacher_logp = self.teachers.log_probs(scoring, sequence_teacher, self.filter,
                                               self.cfg.train.loss_chunk_size)
        # A token outside the teacher's sampling set (only with top-k/top-p) has no finite advantage: not trained.
        resp = scoring["loss_mask"] * np.isfinite(teacher_logp)
        batch["loss_mask"] = batch["loss_mask"] * np.isfinite(teacher_logp)
        advantage = np.asarray(losses.mopd_advantages(np.where(resp > 0, teacher_logp, 0.0), train_logp, resp))
        batch["advantages"] = advantage + self.cfg.mopd.outcome_weight * batch["advantages"]
        trained = batch["loss_mask"] > 0
        token_teacher = np.where(batch["sequence"] >= 0, sequence_teacher[np.maximum(batch["sequence"], 0)], -1)
        metrics = {"mopd_advantage_mean": float(advantage[trained].mean()) if trained.any() else 0.0}
        for j, name in enumerate(self.teachers.names):
            mine = trained & (token_teacher == j)
            if mine.any():
                metrics[f"mopd_advantage/{name.replace(', ', '+')}"] = float(advantage[mine].mean())
        return metrics

    # ------------------------------------------------------------------ the update
    def train(self, state, batch):
        started = time.perf_counter()
        step = int(state.step)
        arrays = {k: jnp.asarray(v) for k, v in batch["arrays"].items()}
        state, out = train_step(state, arrays, graphdef=self.graphdef, tx=self.tx, loss_fn=self.loss_fn,
                                bias_update_rate=self.cfg.moe.bias_update_rate)
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        tokens = max(out["loss_tokens"], 1.0)
        metrics = dict(batch["metrics"], loss=out["loss"], grad_norm=out["grad_norm"], loss_tokens=out["loss_tokens"],
                       lr=float(self.schedule(step)), clip_fraction=out["clip_tokens"] / tokens,
                       is_weight_mean=out["is_weight_sum"] / tokens, is_zeroed=out["is_zeroed_tokens"] / tokens,
                       kl=out["kl_sum"] / tokens, train_s=time.perf_counter() - started)
        if "expert_imbalance" in out:
            metrics["expert_imbalance"] = out["expert_imbalance"]
        return state, metrics

    def data_state(self) -> dict:
        return self.iterator.get_state()

    def restore_data(self, data_state: dict) -> None:
        self.iterator.set_state(data_state)


def repetition(tokens, n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier one (0: none; → 1: a loop). On-policy distillation
    can drift into long repetitive answers, so every stage logs it."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _prompt_text(messages: list[dict]) -> str:
    """The last user turn: what a judge reads as the prompt."""
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def _evaluations(cfg: RLConfig, tokenizer, graphdef, start_weights, judge) -> tuple[Evaluation, ...]:
    t, evaluations = cfg.train, []
    if t.accuracy_eval_tasks and t.accuracy_eval_every > 0:
        tasks = read_task_prompts(t.accuracy_eval_tasks, t.accuracy_eval_samples)
        evaluations.append(Evaluation(t.accuracy_eval_every, TaskAccuracy(
            tasks, tokenizer, graphdef, thinking=t.accuracy_thinking, max_new_tokens=t.accuracy_max_new_tokens)))
    if t.judge_eval_every > 0:
        tasks = read_task_prompts(t.judge_eval_tasks, t.judge_eval_samples)
        evaluations.append(Evaluation(t.judge_eval_every, JudgeWinRate(
            tasks, tokenizer, graphdef, start_weights, judge, thinking=t.accuracy_thinking,
            max_new_tokens=t.accuracy_max_new_tokens)))
    return tuple(evaluations)


def run_grpo(cfg: RLConfig) -> LoopResult:
    """Run (or resume) the stage to `train.steps`; the same command after a crash continues at its step."""
    if not cfg.mesh.is_single_device():
        raise ValueError("mesh: cascade-rl runs on one device for now (set every mesh size to 1)")
    if cfg.model.from_pretrained is None:
        raise ValueError("model.from_pretrained: a GRPO stage starts from a checkpoint (e.g. the SFT run directory)")
    if not os.path.exists(cfg.model.from_pretrained):
        raise ValueError(f"model.from_pretrained: no such checkpoint {cfg.model.from_pretrained} (the tiny stage starts "
                         f"from the SFT run: cascade-sft --config configs/sft/tiny.yaml)")
    start, run_dir = os.path.abspath(cfg.model.from_pretrained), os.path.abspath(cfg.run_dir)
    if os.path.commonpath([start, run_dir]) == run_dir:
        raise ValueError(f"run_dir: {cfg.run_dir} holds the starting checkpoint {cfg.model.from_pretrained}; "
                         f"write the stage to a new run_dir")
    complete = check_resume(cfg)
    if complete is not None:
        return LoopResult(step=complete["step"], steps=cfg.train.steps, reason="already_complete", metrics={},
                          checkpoint_steps=[])
    prompts = RLPrompts(cfg.prompts)
    tx = build_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, model_config = initial_state(cfg, tx, None)
    # The stage's start (copied: the train step donates the state's buffers): the KL reference, and the
    # baseline of a judge's held-out win rate.
    needs_start = cfg.grpo.kl_coef or cfg.train.judge_eval_every
    start_weights = jax.tree.map(jnp.copy, (state.params, state.expert_bias)) if needs_start else None
    teachers = None
    if cfg.algorithm == "mopd":
        teachers = Teachers(cfg.mopd, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            student_config=model_config)
    with StageRewards(cfg.reward, cfg.prompts.group_size, log_dir=cfg.run_dir) as rewards:
        evaluations = _evaluations(cfg, prompts.tokenizer, graphdef, start_weights, rewards.judge_config)
        loop = TrainLoop(cfg.run_dir, steps=cfg.train.steps, checkpoint=cfg.checkpoint, log_every=cfg.train.log_every,
                         resume=cfg.resume, evaluations=evaluations, run_record=run_record(cfg, model_config),
                         desc=cfg.algorithm)
        task = GRPOTask(cfg, prompts, graphdef, tx, rewards, start_weights if cfg.grpo.kl_coef else None, teachers)
        _, result = loop.run(task, state)
    return result
