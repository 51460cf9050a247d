"""One GRPO stage end to end on a random tiny checkpoint: metrics, checkpoints, the contract, exact resume."""

import json
import os
import shutil

import numpy as np
import pytest

import cascade_jax as cj
from cascade_jax.rl.config import load_rl_config
from cascade_jax.rl.grpo import run_grpo
from tests.cli.test_generate import make_checkpoint

TIMING = ("rollout_s", "reward_s", "logprob_s", "train_s")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("grpo") / "start")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Prompts whose partial-credit reward varies over a random model's answers (word-count limits)."""
    path = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    constraints = [{"type": "max_words", "n": n} for n in (1, 2, 3, 4, 5, 6)]
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say something short, {i}."}],
                                "domain": "instruction_following",
                                "verifier": {"kind": "ifeval", "mode": "fraction", "constraints": constraints}})
                    + "\n")
    return str(path)


def _config(start, run_dir, prompts, *extra):
    return load_rl_config("configs/rl/tiny.yaml", [
        f"prompts.sources=[{{paths: [{prompts}]}}]", f"run_dir={run_dir}", f"model.from_pretrained={start}", "prompts.prompts_per_step=2",
        "prompts.group_size=3", "rollout.max_new_tokens=8", "rollout.max_slots=6", "train.steps=3",
        "train.rows_per_micro_batch=2", "train.accuracy_eval_every=0", "checkpoint.every=1", "checkpoint.keep=5",
        "checkpoint.async_save=false", "reward.num_workers=1", "optimizer.lr=1e-3",
        "grpo.overlong=none", *extra])   # every 8-token answer is truncated: keep their rewards


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: {k: v for k, v in row.items() if k not in TIMING} for row in rows if "loss" in row}


def test_a_stage_trains_logs_and_leaves_a_loadable_checkpoint(start, prompts, tmp_path):
    run_dir = tmp_path / "rl"
    result = run_grpo(_config(start, run_dir, prompts))
    assert result.reason == "complete" and result.step == 3
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [1, 2, 3]
    for key in ("reward_mean", "pass_rate", "response_length", "truncation_rate", "filtered_groups", "entropy",
                "clip_fraction", "is_weight_mean", "masked_sequences", "logprob_error_max", "grad_norm", "loss"):
        assert all(np.isfinite(m[key]) for m in metrics.values()), key
    # The sampler and the trainer score the same tokens alike (fp32, same weights before each update).
    assert all(m["logprob_error_max"] < 1e-3 for m in metrics.values())
    assert all(m["masked_sequences"] == 0 for m in metrics.values())
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        first_line = json.loads(f.readline())
    assert all(k in first_line for k in TIMING)
    assert any(m["loss_tokens"] > 1 and m["grad_norm"] > 0 for m in metrics.values())   # some groups kept
    model = cj.load_pretrained(str(run_dir))   # the run directory is a checkpoint like any other
    assert model.config == cj.load_pretrained(start).config


def test_a_resumed_stage_repeats_the_uninterrupted_steps(start, prompts, tmp_path):
    """Rerunning after losing the last step's checkpoint resumes at step 3 on the same prompts and seeds."""
    run_dir = tmp_path / "rl"
    run_grpo(_config(start, run_dir, prompts))
    first = _metrics(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "3")
    os.remove(run_dir / "complete.json")
    result = run_grpo(_config(start, run_dir, prompts))
    assert result.reason == "complete"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        again = [json.loads(line) for line in f][-1]
    assert again["step"] == 3
    assert {k: v for k, v in again.items() if k not in TIMING} == first[3]


def test_a_stage_needs_a_starting_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="model.from_pretrained"):
        run_grpo(load_rl_config("configs/rl/tiny.yaml", [f"run_dir={tmp_path}", "model.from_pretrained=null"]))


def test_group_max_mask_leaves_groups_without_a_good_rollout_out_of_the_loss(start, prompts, tmp_path):
    """The agentless-SWE rule: a group whose best reward is <= the threshold trains nothing (fraction rewards
    here never reach 1.0, so a threshold of 1.0 masks every group; 0.0 masks none that has any credit)."""
    masked = tmp_path / "masked"
    run_grpo(_config(start, masked, prompts, "train.steps=1", "grpo.group_max_mask=1.0", "grpo.dynamic_filter=false"))
    kept = tmp_path / "kept"
    run_grpo(_config(start, kept, prompts, "train.steps=1", "grpo.group_max_mask=0.0", "grpo.dynamic_filter=false"))
    masked_row, kept_row = _metrics(masked)[1], _metrics(kept)[1]
    assert masked_row["reward_mean"] < 1.0
    assert masked_row["loss"] == 0 and masked_row["grad_norm"] == 0   # (the step reports at least 1 loss token)
    assert kept_row["loss_tokens"] > 1 and kept_row["grad_norm"] > 0
