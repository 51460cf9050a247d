"""`cascade-sft` as a user meets it: bad config values, unusable or finite data, a stop signal while the
run waits for data, and rerunning a finished run. Each run is the real command in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cascade_jax.cli.sft import main
from tests.train.test_sft import RECIPE, SMALL

TINY_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "cascade_jax", "data", "assets", "tiny", "sft.jsonl")


def _sources(path) -> str:
    return f"data.sources=[{{paths: ['{path}']}}]"


def _command(run_dir, *extra):
    return [sys.executable, "-m", "cascade_jax.cli.sft", "--config", RECIPE, *SMALL, f"run_dir={run_dir}", *extra]


def _run(run_dir, *extra, timeout=300):
    return subprocess.run(_command(run_dir, *extra), capture_output=True, text=True, timeout=timeout)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("cascade-sft: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr: expected a number > 0.0, got -1.0"),
    ("train.steps=abc", "train.steps"),
    ("data.batch_size=0", "data.batch_size"),
    ("train.stpes=3", "train.stpes"),
])
def test_bad_values_name_the_key_and_leave_nothing(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["--config", RECIPE, f"run_dir={run_dir}", override]) == 1
    line = _error_line(capsys.readouterr().err)
    assert message in line, line
    assert not run_dir.exists()


def test_data_with_no_usable_record_fails_in_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{oops\n' * 50 + json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    started = time.monotonic()
    out = _run(tmp_path / "run", _sources(bad), timeout=120)
    assert out.returncode == 1
    line = _error_line(out.stderr)
    assert "no usable record" in line and "bad.jsonl" in line, line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def test_sigterm_while_waiting_for_data_stops_at_once(tmp_path):
    slow = tmp_path / "slow.jsonl"     # minutes of malformed lines before the first usable one
    with open(slow, "w") as f, open(TINY_DATA) as good:
        f.write("{oops\n" * 20_000_000)
        f.write(good.readline())
    process = subprocess.Popen(_command(tmp_path / "run", _sources(slow), "train.steps=5"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    while "sft:" not in output:            # the progress bar: the loop is fetching the first batch
        char = process.stdout.read(1)
        assert char, output
        output += char
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest, _ = process.communicate(timeout=60)
    output += rest
    assert time.monotonic() - sent < 20, output
    assert process.returncode == 0, output
    assert "stopped by SIGTERM at step 0" in output and "no checkpoint was written" in output, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_finite_data_ends_the_run_and_a_rerun_changes_nothing(tmp_path):
    few = tmp_path / "few.jsonl"
    with open(TINY_DATA) as f:
        few.write_text("".join(f.readline() for _ in range(12)))
    run_dir = tmp_path / "run"
    args = [_sources(few), "data.num_epochs=1", "train.steps=1000", "checkpoint.async_save=false"]
    out = _run(run_dir, *args)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert "the data ran out after step" in out.stdout, out.stdout
    reached = json.loads((run_dir / "complete.json").read_text())
    assert 1 <= reached["step"] < 1000 and reached["steps"] == 1000
    assert str(reached["step"]) in os.listdir(run_dir / "checkpoints")
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "complete.json")}

    again = _run(run_dir, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"is already complete (step {reached['step']}); nothing to do" in again.stdout
    assert "resumed" not in again.stdout + again.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before

    changed = _run(run_dir, *args, "optimizer.lr=1e-4")
    assert changed.returncode == 1
    assert "optimizer.lr: 0.003 -> 0.0001" in _error_line(changed.stderr)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
