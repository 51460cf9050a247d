"""cascade_jax.rl.report: the end-of-cascade report from synthetic metrics and eval results."""

import json
import os

from cascade_jax.rl.report import curve, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def result(scores: dict[str, tuple[float, float]], k: int = 4) -> dict:
    return {"suite": "tiny", "pass_k": k, "samples": k,
            "domains": {d: {"n": 12, "greedy": g, "greedy_reward": g, f"pass@{k}": p, "sample_reward": g}
                        for d, (g, p) in scores.items()}, "seconds": 1.0}


def write_metrics(run_dir, lines):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def make_cascade(tmp_path):
    sft, ifrl, mopd = (str(tmp_path / name) for name in ("sft", "ifrl", "mopd"))
    write_metrics(sft, [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 1.5}])
    write_metrics(ifrl, [{"step": 1, "reward_mean": 0.2, "pass_rate": 0.1}, {"step": 2, "pass_rate": 0.2},
                         "not json", {"step": 3, "reward_mean": 0.4}, {"step": 3, "reward_mean": 0.45}])
    write_metrics(mopd, [{"step": 1, "mopd_advantage_mean": -0.3, "reward_mean": 0.5},
                         {"step": 2, "mopd_advantage_mean": -0.1}])
    stages = [
        {"name": "sft", "kind": "sft", "run_dir": sft, "seconds": 120.0, "domains": []},
        {"name": "if-rl", "kind": "grpo", "run_dir": ifrl, "seconds": 3725.5, "domains": ["instruction_following"]},
        {"name": "mopd", "kind": "mopd", "run_dir": mopd, "seconds": None, "domains": ["math", "code"]},
        {"name": "lost", "kind": "grpo", "run_dir": str(tmp_path / "missing"), "seconds": 5.0, "domains": []},
    ]
    evals = [
        ("start", result({"math": (0.125, 0.25), "instruction_following": (0.5, 0.625), "code": (0.0, 0.0)})),
        ("sft", result({"math": (0.25, 0.5), "instruction_following": (0.5625, 0.75), "code": (0.083, 0.167)})),
        ("if-rl", result({"math": (0.25, 0.5), "instruction_following": (0.6875, 0.8125), "code": (0.083, 0.25)})),
        ("mopd", result({"math": (0.375, 0.625), "instruction_following": (0.6875, 0.875), "code": (0.167, 0.333)})),
    ]
    return stages, evals


def test_report_files_and_numbers(tmp_path):
    stages, evals = make_cascade(tmp_path)
    out = tmp_path / "report"
    paths = write_report(str(out), stages, evals, extra_sections=["## Teachers\n\nall within the margin"])
    assert set(paths) == {"report", "rewards", "evals"}
    for key in ("rewards", "evals"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == PNG, key
        assert os.path.getsize(paths[key]) > 1000
    assert sorted(os.listdir(out)) == ["evals.png", "report.md", "rewards.png"]   # no temp file left
    md = open(paths["report"]).read()
    assert "| eval | math | instruction_following | code |" in md
    # results without samples' pass@1: "–", then greedy / pass@k; the changes fall back to greedy
    assert "| start | – / 0.125 / 0.250 | – / 0.500 / 0.625 | – / 0.000 / 0.000 |" in md
    assert "| mopd | – / 0.375 / 0.625 | – / 0.688 / 0.875 | – / 0.167 / 0.333 |" in md
    assert "pass@4" in md
    # wall time: seconds and h:mm:ss, total of the known ones
    assert "| if-rl | grpo | 3725.5 | 1:02:06 |" in md and "| mopd | mopd | – | – |" in md
    assert "| total | | 3850.5 |" in md
    # own domains: after minus the eval just before the stage
    assert "| if-rl | instruction_following | sft 0.562 | 0.688 | +0.125 |" in md
    assert "| mopd | math | if-rl 0.250 | 0.375 | +0.125 |" in md
    assert "| mopd | code | if-rl 0.083 | 0.167 | +0.084 |" in md
    # training curves: grpo draws reward_mean, mopd its advantage; a missing metrics file is tolerated
    assert "| if-rl | grpo | 3 | reward_mean | 0.200 | 0.450 |" in md
    assert "| mopd | mopd | 2 | mopd_advantage_mean | -0.300 | -0.100 |" in md
    assert "| lost | grpo | 0 | – | – | – |" in md
    assert md.rstrip().endswith("all within the margin")


def test_a_stage_can_name_its_start(tmp_path):
    stages, evals = make_cascade(tmp_path)
    stages[2]["start"] = "start"   # e.g. a side branch trained from the start checkpoint
    md = open(write_report(str(tmp_path / "r"), stages, evals)["report"]).read()
    assert "| mopd | math | start 0.125 | 0.375 | +0.250 |" in md


def test_no_rl_stages_and_no_evals_still_write_valid_files(tmp_path):
    paths = write_report(str(tmp_path / "empty"), [], [])
    for key in ("rewards", "evals"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == PNG
    assert "No held-out evaluations" in open(paths["report"]).read()


def test_metrics_reading_merges_repeated_steps_and_skips_bad_lines(tmp_path):
    write_metrics(tmp_path, [{"step": 2, "a": 1.0}, "{", {"step": 1, "a": 0.5}, {"step": 2, "b": 3.0},
                             {"no_step": 1}, {"step": 2, "a": 2.0}])
    assert read_metrics(str(tmp_path)) == [{"step": 1, "a": 0.5}, {"step": 2, "a": 2.0, "b": 3.0}]
    assert read_metrics(str(tmp_path / "nothing")) == [] and read_metrics(None) == []
    key, steps, values = curve([{"step": 1, "pass_rate": 0.5}, {"step": 2, "reward_mean": float("nan")}], "grpo")
    assert (key, steps, values) == ("pass_rate", [1], [0.5])
