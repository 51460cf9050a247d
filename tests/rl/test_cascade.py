"""The cascade runner end to end on a random tiny checkpoint: GRPO stage → MOPD stage (teacher: the first
stage and the start), stage folders with done markers, evaluations, report, HF export; a rerun says it is
complete; `--stage` runs one stage; a crash inside a stage (SIGKILL) resumes in that stage at its step and
leaves the finished stage untouched."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import cascade_jax as cj
from cascade_jax.cli.rl import main as rl_main
from tests.cli.test_generate import make_checkpoint
from tests.reference.ref_python import ref_python

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cascade") / "start")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prompts whose partial-credit reward varies over a random model's answers, and a 2-record eval suite."""
    folder = tmp_path_factory.mktemp("cascade-data")
    constraints = [{"type": "max_words", "n": n} for n in (1, 2, 3, 4, 5, 6)]
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say something short, {i}."}],
                                "domain": "instruction_following", "source": "tiny-if",
                                "verifier": {"kind": "ifeval", "mode": "fraction", "constraints": constraints}})
                    + "\n")
    with open(folder / "eval.jsonl", "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "domain": "instruction_following",
                            "verifier": {"kind": "ifeval", "constraints": [{"type": "max_words", "n": 40}]}}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "domain": "math",
                            "verifier": {"kind": "boxed_number", "answer": "4"}}) + "\n")
    return folder


def recipe(path, start, data, run_dir, steps=(2, 2), checkpoint_every=1):
    stage_settings = {"prompts": {"sources": [{"paths": [str(data / "prompts.jsonl")], "name": "tiny-if"}]}}
    text = {
        "run_dir": str(run_dir), "start": str(start),
        "eval": {"suite": str(data / "eval.jsonl"), "pass_k": 1, "max_new_tokens": 8},
        "defaults": {
            "prompts": {"tokenizer": "${bundled:tiny_tokenizer}", "prompts_per_step": 2, "group_size": 3,
                        "max_prompt_len": 96, "enable_thinking": False},
            "rollout": {"max_new_tokens": 8, "max_slots": 6},
            "grpo": {"overlong": "none"},
            "reward": {"num_workers": 1},
            "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0},
            "train": {"rows_per_micro_batch": 2},
            "checkpoint": {"every": checkpoint_every, "keep": 10, "async_save": False},
        },
        "stages": [
            {"name": "first", "kind": "grpo", "domains": ["instruction_following"],
             "settings": {**stage_settings, "train": {"steps": steps[0]}}},
            {"name": "distill", "kind": "mopd", "domains": ["instruction_following"],
             "settings": {**stage_settings, "train": {"steps": steps[1]}, "grpo": {"dynamic_filter": False},
                          "mopd": {"teachers": {"sft": "start", "first": "stage:first"},
                                   "routing": {"instruction_following": "first"}, "default_teacher": "sft"}}},
        ],
    }
    path.write_text(yaml.safe_dump(text))
    return str(path)


def test_a_cascade_runs_its_stages_in_order_and_leaves_evals_report_and_export(start, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = recipe(tmp_path / "recipe.yaml", start, data, run_dir)
    assert rl_main(["--config", path]) == 0
    out = capsys.readouterr().out
    stages = run_dir / "stages"
    assert sorted(os.listdir(stages)) == ["00-first", "01-distill"]
    for name in ("00-first", "01-distill"):
        marker = json.loads((stages / name / "stage_done.json").read_text())
        assert marker["step"] == 2
        assert json.loads((stages / name / "complete.json").read_text())["step"] == 2
    # the second stage started from the first's result, its teachers were the start and the first stage
    distill = yaml.safe_load((stages / "01-distill" / "config.yaml").read_text())
    assert distill["model"]["from_pretrained"] == str(stages / "00-first")
    assert distill["mopd"]["teachers"] == {"sft": str(start), "first": str(stages / "00-first")}
    metrics = [json.loads(line) for line in open(stages / "01-distill" / "metrics.jsonl")]
    assert any("mopd_advantage_mean" in m for m in metrics) and any("repetition" in m for m in metrics)
    assert sorted(os.listdir(run_dir / "evals")) == ["distill.json", "first.json", "start.json"]
    for name in ("report.md", "rewards.png", "evals.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "MOPD: distilled domains against their teachers" in report and "instruction_following" in report
    exported = cj.load_pretrained(str(run_dir / "hf"))
    assert exported.config == cj.load_pretrained(str(stages / "01-distill")).config
    if ref_python() is not None:   # the export runs in transformers with our logits
        ids = np.random.default_rng(0).integers(3, exported.config.vocab_size, (2, 12)).astype(np.int32)
        np.savez(tmp_path / "expected.npz", input_ids=ids, logits=np.asarray(exported(ids).logits, np.float32))
        check = subprocess.run([str(ref_python()), str(REPO / "tests" / "reference" / "check_export.py"),
                                str(run_dir / "hf"), "--expect-logits", str(tmp_path / "expected.npz")],
                               capture_output=True, text=True, timeout=600)
        assert check.returncode == 0 and check.stdout.startswith("ok: "), check.stdout + check.stderr[-2000:]
    assert "report:" in out and "wall time" in out and str(run_dir / "hf") in out

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert rl_main(["--config", path]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_one_stage_runs_alone_once_its_start_exists(start, data, tmp_path, capsys):
    path = recipe(tmp_path / "recipe.yaml", start, data, tmp_path / "run", steps=(1, 1))
    assert rl_main(["--config", path, "--stage", "distill"]) == 1
    assert "its start" in capsys.readouterr().err and not (tmp_path / "run" / "stages").exists()
    assert rl_main(["--config", path, "--stage", "first"]) == 0
    assert "stage first is done" in capsys.readouterr().out
    assert not (tmp_path / "run" / "stages" / "01-distill").exists()
    assert rl_main(["--config", path, "--stage", "nope"]) == 1
    assert "no stage 'nope'" in capsys.readouterr().err


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_inside_a_stage_resumes_there_and_keeps_finished_stages(start, data, tmp_path):
    run_dir = tmp_path / "run"
    path = recipe(tmp_path / "recipe.yaml", start, data, run_dir, steps=(2, 12))
    command = [sys.executable, "-m", "cascade_jax.cli.rl", "--config", path]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    second = run_dir / "stages" / "01-distill" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        steps = [int(n) for n in os.listdir(second) if n.isdigit()] if second.is_dir() else []
        if steps and max(steps) >= 3:
            break
        time.sleep(0.5)
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_stage = run_dir / "stages" / "00-first"
    finished = _tree_digest(first_stage)
    assert (first_stage / "stage_done.json").is_file()
    assert not (run_dir / "stages" / "01-distill" / "stage_done.json").exists()
    killed_at = max(int(n) for n in os.listdir(second) if n.isdigit())

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    output = rerun.stdout + rerun.stderr
    assert "stage 1/2 first is done" in output
    resumed = [int(line.rsplit("step ", 1)[1].split()[0]) for line in output.splitlines()
               if "resumed from step" in line]
    assert resumed and resumed[0] >= killed_at - 1   # the newest checkpoint that finished writing
    assert _tree_digest(first_stage) == finished
    assert json.loads((run_dir / "stages" / "01-distill" / "stage_done.json").read_text())["step"] == 12
    assert (run_dir / "cascade_done.json").is_file()


@pytest.mark.parametrize("override, message", [
    (["start=/nonexistent"], "start: no such checkpoint /nonexistent"),
    (["stages.0.settings.optimizer.lr=-1"], "stages[0] (first): optimizer.lr"),
    (["stages.1.settings.mopd.teachers.first=stage:later"], "names no earlier stage"),
])
def test_bad_input_is_one_line_and_leaves_nothing(start, data, tmp_path, capsys, override, message):
    path = recipe(tmp_path / "recipe.yaml", start, data, tmp_path / "run")
    assert rl_main(["--config", path, *override]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascade-rl: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
