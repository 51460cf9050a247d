"""--out may not be, contain or lie inside an input directory, whatever the flags: one error line naming
both paths, exit 1 (as every bad input), and nothing created, changed or deleted."""

import os
import shutil

import pytest

from tools.convert_hf.__main__ import main
from tools.convert_hf.to_jax import convert_to_jax


def _tree(root) -> dict:
    """Every entry under root: file bytes, link targets, folders (links are not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                found[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[key] = ("dir",)
            else:
                with open(path, "rb") as f:
                    found[key] = ("file", f.read())
    return found


def _refused(capsys, tmp_path, argv, out, source, relation):
    before = _tree(tmp_path)
    assert main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {out} "), err
    assert str(source) in err and relation in err and "choose a directory" in err, err
    assert _tree(tmp_path) == before, "refusal created, changed or deleted something"


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    """A converted checkpoint (tmp_path/ckpt) and the same parameters as a run directory (tmp_path/run)."""
    convert_to_jax(hf_dir, tmp_path / "ckpt", progress=False)
    step = tmp_path / "run" / "checkpoints" / "5"
    shutil.copytree(tmp_path / "ckpt" / "params", step / "state")
    shutil.copy(tmp_path / "ckpt" / "cascade_config.json", tmp_path / "run")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_to_jax_out_is_input(capsys, hf_dir, tmp_path, overwrite):
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(hf_dir), "--out", str(hf_dir), *overwrite],
             hf_dir, hf_dir, "is the input --hf")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_to_jax_out_inside_input(capsys, hf_dir, tmp_path, overwrite):
    out = hf_dir / "converted"
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(hf_dir), "--out", str(out), *overwrite],
             out, hf_dir, "is inside the input --hf")


def test_to_jax_input_inside_out(capsys, hf_dir, tmp_path):
    out = hf_dir.parent   # tmp_path/in, which holds the input model/
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(hf_dir), "--out", str(out), "--overwrite"],
             out, hf_dir, "contains the input --hf")


def test_to_jax_through_symlinks(capsys, hf_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(hf_dir, target_is_directory=True)
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(hf_dir), "--out", str(link), "--overwrite"],
             f"{link} (= {hf_dir})", hf_dir, "is the input --hf")
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(link), "--out", str(hf_dir / "sub"), "--overwrite"],
             hf_dir / "sub", link, "is inside the input --hf")


def test_to_jax_out_holds_symlinked_files(capsys, hf_dir, tmp_path):
    """An HF hub snapshot: its files are links into blobs/, which --overwrite would delete."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    shutil.copytree(hf_dir, blobs)
    snapshot.mkdir(parents=True)
    for name in os.listdir(blobs):
        (snapshot / name).symlink_to(blobs / name)
    _refused(capsys, tmp_path, ["to-jax", "--hf", str(snapshot), "--out", str(blobs), "--overwrite"],
             blobs, snapshot, f"is {blobs}, which holds files of the input --hf")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_to_hf_out_is_input(capsys, ckpt, tmp_path, overwrite):
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(ckpt), "--out", str(ckpt), *overwrite],
             ckpt, ckpt, "is the input --ckpt")


def test_to_hf_out_inside_and_around_input(capsys, ckpt, tmp_path):
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(ckpt), "--out", str(ckpt / "hf"), "--overwrite"],
             ckpt / "hf", ckpt, "is inside the input --ckpt")
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(ckpt / "params"), "--out", str(ckpt), "--overwrite"],
             ckpt, ckpt / "params", "contains the input --ckpt")
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path), "--overwrite"],
             tmp_path, ckpt, "contains the input --ckpt")


def test_to_hf_out_inside_the_run_of_a_step(capsys, ckpt, tmp_path):
    run, step = tmp_path / "run", tmp_path / "run" / "checkpoints" / "5"
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(step), "--out", str(run / "export"), "--overwrite"],
             run / "export", f"the run directory {run} of the input --ckpt {step}", "is inside")
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(step), "--out", str(run), "--overwrite"],
             run, step, "contains the input --ckpt")
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(step), "--out", str(run / "checkpoints" / "6"), "--overwrite"],
             run / "checkpoints" / "6", f"the run directory {run} of the input --ckpt {step}", "is inside")
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(run), "--out", str(step / "hf"), "--overwrite"],
             step / "hf", run, "is inside the input --ckpt")


def test_to_hf_through_symlink(capsys, ckpt, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "run", target_is_directory=True)
    step = tmp_path / "run" / "checkpoints" / "5"
    _refused(capsys, tmp_path, ["to-hf", "--ckpt", str(step), "--out", str(link / "hf"), "--overwrite"],
             f"{link / 'hf'} (= {tmp_path / 'run' / 'hf'})", "the run directory", "is inside")


def test_beside_the_input_is_fine(capsys, hf_dir, ckpt, tmp_path):
    """Siblings whose names share a prefix are not inside one another."""
    assert main(["to-jax", "--hf", str(hf_dir), "--out", f"{hf_dir}2", "--no-progress"]) == 0
    assert main(["to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "run2"), "--no-progress"]) == 0
    assert (tmp_path / "run2" / "config.json").is_file() and (tmp_path / "in" / "model2" / "params").is_dir()
