"""A judge-rewarded GRPO stage (RLHF): pairwise rewards over each group, KL k3 to the stage start, and the
held-out win rate against the start's answers."""

import json
import types

import numpy as np
import pytest

from cascade_jax.rl.config import load_rl_config
from cascade_jax.rl.grpo import run_grpo
from cascade_jax.rl.judge_eval import JudgeWinRate
from cascade_jax.rl.rewards.judge import JudgeConfig
from tests.cli.test_generate import make_checkpoint
from tests.rl.test_pairwise import FakeJudge, serve_app


@pytest.fixture(scope="module")
def fake():
    judge = FakeJudge()   # prefers the longer answer; equal answers tie
    with serve_app(judge.app) as base_url:
        judge.base_url = base_url
        yield judge


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("rlhf") / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about owls, {i}."}],
                                "domain": "chat", "verifier": {"kind": "judge"}}) + "\n")
    return str(path)


def test_an_rlhf_stage_trains_on_pairwise_rewards_with_kl(fake, prompts, tmp_path):
    start = make_checkpoint(tmp_path / "start")
    run_dir = tmp_path / "rlhf"
    cfg = load_rl_config("configs/rl/tiny.yaml", [
        f"prompts.sources=[{{paths: [{prompts}]}}]", f"run_dir={run_dir}", f"model.from_pretrained={start}",
        "prompts.prompts_per_step=2", "prompts.group_size=3", "rollout.max_new_tokens=8", "rollout.max_slots=6",
        "train.steps=2", "train.rows_per_micro_batch=2", "train.accuracy_eval_every=0", "checkpoint.every=1",
        "checkpoint.async_save=false", "grpo.overlong=none", "grpo.kl_coef=0.03", "grpo.kl_kind=k3",
        "reward.kind=pairwise_judge", f"reward.judge.base_url={fake.base_url}", "reward.judge.model=fake",
        "train.judge_eval_every=2", f"train.judge_eval_tasks={prompts}", "train.judge_eval_samples=3",
        "optimizer.lr=1e-3"])
    asked = len(fake.messages)
    assert run_grpo(cfg).reason == "complete"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 2 and all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in trained)
    assert all(r["reward_malformed"] == 0 and r["reward_http_error"] == 0 for r in trained)   # every verdict parsed
    evals = [r for r in rows if "eval_judge_win_rate" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval_judge_win_rate"] == 0.5            # the start against itself: ties, both orders
    # 2 steps × 6 comparisons, plus 2 evaluations × 3 prompts × both orders
    assert len(fake.messages) - asked == 2 * 6 + 2 * 3 * 2


def test_win_rate_counts_both_orders(fake):
    tasks = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    tokenizer = types.SimpleNamespace(encode_prompt=lambda *a, **k: [1, 2, 3], eos_id=0)
    judge = JudgeConfig(base_url=fake.base_url, model="fake", timeout_s=5, max_retries=0)
    win_rate = JudgeWinRate(tasks, tokenizer, None, ("start",), judge, thinking=False, max_new_tokens=4)
    answers = {"start": ["short"] * 4, "longer": ["a much longer answer"] * 4, "shorter": ["s"] * 4}
    win_rate._answers = lambda params, expert_bias=None: answers[params]
    assert win_rate(types.SimpleNamespace(params="longer", expert_bias=None), 1)["eval_judge_win_rate"] == 1.0
    assert win_rate(types.SimpleNamespace(params="shorter", expert_bias=None), 2)["eval_judge_win_rate"] == 0.0
    assert win_rate(types.SimpleNamespace(params="start", expert_bias=None), 3)["eval_judge_win_rate"] == 0.5
