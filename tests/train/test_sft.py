"""The SFT loop end to end on a very small model: learning, exact resume, signals, divergence, corrupt checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cascade_jax.train.config import load_sft_config
from cascade_jax.train.sft import TrainingDiverged, run_sft

SMALL = [
    "model.overrides={hidden_size: 64, layer_pattern: 'ME*M', num_attention_heads: 2, head_dim: 16, "
    "mamba_num_heads: 4, mamba_head_dim: 16, n_routed_experts: 4, moe_intermediate_size: 32, "
    "moe_shared_expert_intermediate_size: 32}",
    "data.max_len=256", "data.batch_size=2", "train.log_every=1", "train.eval_every=0",
    "train.accuracy_eval_every=0", "train.eval_data=null", "optimizer.warmup_steps=2", "optimizer.lr=3e-3",
]
RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft", "tiny.yaml")


def _config(run_dir, *extra):
    return load_sft_config(RECIPE, SMALL + [f"run_dir={run_dir}", *extra])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _cli(run_dir, *extra):
    args = [sys.executable, "-m", "cascade_jax.cli.sft", "--config", RECIPE, *SMALL, f"run_dir={run_dir}", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run_dir, step, process, timeout=300):
    path = os.path.join(run_dir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def test_loss_falls_and_resume_after_sigkill_is_exact(tmp_path):
    steps = ["train.steps=8", "checkpoint.every=3", "checkpoint.async_save=false"]
    run_sft(_config(tmp_path / "straight", *steps))
    straight = _losses(tmp_path / "straight")
    assert straight[8] < straight[1] - 0.5

    killed = tmp_path / "killed"
    process = _cli(killed, *steps, "train.steps=100")
    _wait_for_checkpoint(killed, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The killed run asked for 100 steps so that it is still running when killed; its schedule agrees with the
    # 8-step one through step 3 (warm-up 2), and the resume to 8 steps is the recorded config change.
    run_sft(_config(killed, *steps, "allow_config_change=true"))
    resumed = _losses(killed)
    for step in range(4, 9):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    process = _cli(tmp_path, "train.steps=1000", "checkpoint.every=1000")
    _wait_for_checkpoint_metrics(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert saved and max(saved) < 1000
    assert "stopped by SIGTERM at step" in output


def _wait_for_checkpoint_metrics(run_dir, process, timeout=300):
    deadline = time.time() + timeout
    while not (os.path.exists(run_dir / "metrics.jsonl") and _losses(run_dir)):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _config(tmp_path, "train.steps=30", "checkpoint.every=1", "checkpoint.async_save=false",
                  "optimizer.lr=1e12", "optimizer.clip_norm=null", "optimizer.warmup_steps=0")
    with pytest.raises(TrainingDiverged, match="training stopped, kept: the checkpoints at steps"):
        run_sft(cfg)
    good = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    losses = _losses(tmp_path)
    assert all(step in losses for step in good)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    steps = ["checkpoint.every=2", "checkpoint.async_save=false"]
    run_sft(_config(tmp_path, "train.steps=4", *steps))
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"corrupt")
    run_sft(_config(tmp_path, "train.steps=5", "allow_config_change=true", *steps))
    assert "checkpoint at step 4 does not restore" in caplog.text
    assert 3 in _losses(tmp_path) and max(_losses(tmp_path)) == 5
    with open(tmp_path / "config_changes.jsonl") as f:
        assert json.loads(f.read())["changes"] == {"train.steps": [4, 5]}
