"""cascade-eval as a user runs it: a subprocess on a real (random-weight) checkpoint; the error paths
in-process (each one line on stderr, exit 1, nothing written)."""

import json
import os
import subprocess
import sys

import pytest

from cascade_jax.cli.eval import main
from tests.cli.test_generate import make_checkpoint

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


def test_table_on_stdout_and_json_written(ckpt, tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "cascade_jax.cli.eval", "--ckpt", ckpt, "--suite", "tiny",
                             "--limit", "1", "--k", "2", "--max-new-tokens", "8", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["domain", "n", "greedy", "reward", "pass@1", "pass@2"]
    for domain in ("math", "instruction_following", "multiple_choice", "code", "all"):
        assert any(line.split()[0] == domain for line in lines[2:]), domain
    record = json.loads(out.read_text())
    assert record["suite"] == "tiny" and record["pass_k"] == 2 and record["checkpoint"] == ckpt
    assert set(record["domains"]) == {"math", "instruction_following", "multiple_choice", "code"}
    for d in record["domains"].values():
        assert d["n"] == 1 and 0.0 <= d["greedy"] <= 1.0 and 0.0 <= d["pass@2"] <= 1.0
    assert os.listdir(tmp_path) == ["results.json"], "temporary file left behind"


def run_main(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:   # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cascade-eval: error: "), err
    return lines[0]


def test_missing_checkpoint(capsys, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_main(capsys, "--ckpt", tmp_path / "nope", "--out", out, "--limit", 1)
    assert code == 1 and stdout == "" and "nope" in one_error_line(err)
    assert not os.path.exists(out)


def test_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.json"
    code, _, err = run_main(capsys, "--ckpt", tmp_path / "empty", "--out", out, "--limit", 1)
    assert code == 1 and "neither an HF model directory" in one_error_line(err)
    assert not os.path.exists(out)


@pytest.mark.parametrize("args, message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--k", "0"], "--k must be an int >= 1"),
    (["--k", "two"], "--k must be an int >= 1"),
    (["--k", "4", "--samples", "2"], "--samples 2 is less than --k 4"),
    (["--domains", "math,chemistry"], "chemistry"),
    (["--limit", "0"], "--limit"),
])
def test_bad_arguments(capsys, ckpt, tmp_path, args, message):
    out = tmp_path / "r.json"
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--out", out, *args)
    assert code == 1 and message in one_error_line(err)
    assert not os.path.exists(out)


def test_malformed_suite_file(capsys, ckpt, tmp_path):
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"messages": [{"role": "user", "content": "hi"}], "domain": "math"}\n')
    out = tmp_path / "r.json"
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--suite", suite, "--out", out)
    assert code == 1 and "suite.jsonl:1: 'verifier'" in one_error_line(err)
    assert not os.path.exists(out)


def test_out_inside_the_checkpoint_is_refused(capsys, ckpt):
    out = os.path.join(ckpt, "results.json")
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--out", out, "--limit", 1)
    assert code == 1 and "inside the checkpoint" in one_error_line(err)
    assert not os.path.exists(out)
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--out", os.path.join(ckpt, "no", "dir", "r.json"))
    assert code == 1 and "does not exist" in one_error_line(err)
