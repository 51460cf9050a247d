"""Bad input: one line on stderr, a non-zero exit, and nothing left in the output's parent."""

import json
import os
import subprocess
import sys

import numpy as np

from tools.convert_hf.__main__ import main


def _fails(capsys, tmp_path, argv, message):
    out_parent = tmp_path / "out"
    assert main(argv + ["--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out_parent.exists() or os.listdir(out_parent) == [], "partial output left behind"


def _to_jax(hf_dir, tmp_path):
    return ["to-jax", "--hf", str(hf_dir), "--out", str(tmp_path / "out" / "ckpt")]


def test_missing_tensor(capsys, hf_dir, tmp_path, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.pop("backbone.layers.2.mixer.D"))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "missing tensor backbone.layers.2.mixer.D")


def test_unexpected_tensor(capsys, hf_dir, tmp_path, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "unexpected tensor backbone.layers.0.mixer.extra")


def test_wrong_shape(capsys, hf_dir, tmp_path, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.update({"backbone.norm_f.weight": np.ones(5, np.float32)}))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "backbone.norm_f.weight: shape (5,), expected (32,)")


def test_wrong_dtype(capsys, hf_dir, tmp_path, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.update({"backbone.layers.2.mixer.A_log": t["backbone.layers.2.mixer.A_log"]
                                         .astype(np.float16)}))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "backbone.layers.2.mixer.A_log: dtype F16, expected F32")


def test_unsupported_model_type(capsys, hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "model_type: expected 'nemotron_h', got 'llama'")


def test_truncated_file(capsys, hf_dir, tmp_path):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "truncated safetensors file")


def test_corrupt_header(capsys, hf_dir, tmp_path):
    data = bytearray((hf_dir / "model.safetensors").read_bytes())
    data[8:20] = b"#not json!!!"
    (hf_dir / "model.safetensors").write_bytes(bytes(data))
    _fails(capsys, tmp_path, _to_jax(hf_dir, tmp_path), "not a readable safetensors file")


def test_output_exists_needs_overwrite(capsys, hf_dir, tmp_path):
    out = tmp_path / "out" / "ckpt"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    assert main(_to_jax(hf_dir, tmp_path) + ["--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists (pass --overwrite" in err
    assert os.listdir(tmp_path / "out") == ["ckpt"] and (out / "keep.txt").exists()
    assert main(_to_jax(hf_dir, tmp_path) + ["--no-progress", "--overwrite"]) == 0
    assert os.listdir(tmp_path / "out") == ["ckpt"] and not (out / "keep.txt").exists()


def test_to_hf_missing_checkpoint(capsys, tmp_path):
    _fails(capsys, tmp_path, ["to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "out" / "hf")],
           "nothing: no such directory")


def test_command_line_entry_point(hf_dir, tmp_path):
    """The real `python -m` entry: summary on success, one error line and exit 1 on failure."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = tmp_path / "cli"
    ok = subprocess.run([sys.executable, "-m", "tools.convert_hf", "to-jax", "--hf", str(hf_dir), "--out", str(out),
                         "--no-progress"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "to-jax: 37 tensors" in ok.stderr, ok.stderr
    again = subprocess.run([sys.executable, "-m", "tools.convert_hf", "to-jax", "--hf", str(hf_dir), "--out", str(out)],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
