"""cascade-rl as a user runs it: one-line errors on bad input, and a SIGKILLed stage that resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade_jax.cli.rl import main
from tests.cli.test_generate import make_checkpoint

REPO = Path(__file__).resolve().parent.parent.parent
TIMING = ("rollout_s", "reward_s", "logprob_s", "train_s")
SMALL = ["prompts.prompts_per_step=2", "prompts.group_size=3", "rollout.max_new_tokens=8", "rollout.max_slots=6",
         "train.rows_per_micro_batch=2", "train.accuracy_eval_every=0", "reward.num_workers=1", "grpo.overlong=none",
         "optimizer.lr=1e-3", "train.steps=10", "checkpoint.every=2", "checkpoint.async_save=false"]


@pytest.mark.parametrize("override, message", [
    ("model.from_pretrained=/no/such/run", "/no/such/run"),
    ("grpo.overlong=sometimes", "grpo.overlong: expected one of"),
    ("rollout.top_p=1.5", "rollout.top_p: expected a value in (0, 1]"),
    ("grpo.no_such_key=1", "no_such_key"),
])
def test_bad_input_is_one_error_line_and_leaves_no_run(tmp_path, capsys, override, message):
    run_dir = tmp_path / "rl"
    assert main(["--config", "configs/rl/tiny.yaml", f"run_dir={run_dir}", override]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cascade-rl: error:") and message in err[0], err
    assert not run_dir.exists()


def test_a_stage_refuses_to_write_into_its_starting_checkpoint(tmp_path, capsys):
    start = make_checkpoint(tmp_path / "start")
    before = sorted(p.name for p in Path(start).iterdir())
    for run_dir in (start, tmp_path):
        assert main(["--config", "configs/rl/tiny.yaml", f"run_dir={run_dir}", f"model.from_pretrained={start}"]) == 1
        assert "holds the starting checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in Path(start).iterdir()) == before


def _metrics_by_step(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r}   # last wins


def _command(start, run_dir):
    return [sys.executable, "-m", "cascade_jax.cli.rl", "--config", "configs/rl/tiny.yaml", f"run_dir={run_dir}",
            f"model.from_pretrained={start}", *SMALL]


@pytest.mark.slow
def test_sigkill_mid_stage_then_the_same_command_gives_the_uninterrupted_metrics(tmp_path):
    start = make_checkpoint(tmp_path / "start")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    straight = tmp_path / "straight"
    subprocess.run(_command(start, straight), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(start, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # kill once step 3 is logged (checkpoint 2 is on disk); 10 steps leave time to catch it however fast a step is
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and 3 in _metrics_by_step(killed):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    assert proc.wait(60) == -signal.SIGKILL, "the run ended before it could be killed mid-stage"
    assert not (killed / "complete.json").exists()
    # the newest checkpoint on disk when the kill landed (2, or 4 when steps are fast)
    newest = max(int(name) for name in os.listdir(killed / "checkpoints") if name.isdigit())
    rerun = subprocess.run(_command(start, killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from step {newest}" in rerun.stdout + rerun.stderr and newest < 10
    want, got = _metrics_by_step(straight), _metrics_by_step(killed)
    assert sorted(got) == list(range(1, 11))
    for step in range(3, 11):
        assert got[step] == want[step], step
