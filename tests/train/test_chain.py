"""The chain as a user runs it: `cascade-sft` → its run directory → `load_pretrained` and `to-hf` → the export.

Every input here is the real output of the command before it (no hand-built checkpoint layouts)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cascade_jax as cj
from cascade_jax.train.checkpoint import RunCheckpoints
from cascade_jax.train.config import load_sft_config
from cascade_jax.train.optimizer import build_optimizer
from cascade_jax.train.setup import build_model
from cascade_jax.train.state import init_train_state
from tests.reference.ref_python import HOW_TO_GET_IT, ref_python

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(REPO, "configs", "sft", "tiny.yaml")
RUN = ["data.max_len=256", "train.steps=3", "checkpoint.every=2",
       "train.eval_every=0", "train.accuracy_eval_every=0", "train.log_every=1", "moe.bias_update_rate=0.01"]


def _run(*args, cwd=REPO):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")   # run_dir relative to the working directory, as in the recipes
    _run("-m", "cascade_jax.cli.sft", "--config", os.path.abspath(RECIPE), *RUN, "run_dir=sft", cwd=base)
    return base / "sft"


def _trained_model(run_dir, step):
    """The model of a step as the trainer itself restores it for resuming (TrainState, optimizer included)."""
    cfg = load_sft_config(RECIPE, RUN + [f"run_dir={run_dir}"])
    graphdef, state = init_train_state(build_model(cfg, 0), build_optimizer(cfg.optimizer, cfg.train.steps), 0)
    checkpoints = RunCheckpoints(str(run_dir / "checkpoints"), every=1, keep=10, async_save=False)
    try:
        restored, _ = checkpoints.restore(step, state)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, restored.params, restored.expert_bias)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 4096, (2, 40)), jnp.int32)


def _logits(model):
    out = model(TOKENS)
    return np.asarray(getattr(out, "logits", out))


def test_run_directory_and_its_steps_load(run_dir, monkeypatch):
    assert (run_dir / "cascade_config.json").is_file() and not (run_dir / "model_config.json").exists()
    trained = _trained_model(run_dir, 3)
    biases = np.asarray(trained.layers[1].mixer.correction_bias[...])
    assert np.abs(biases).max() > 0, "load balancing moved the router biases; the test needs them non-zero"
    loaded = cj.load_pretrained(run_dir)          # the newest step
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].mixer.correction_bias[...]), biases)
    np.testing.assert_array_equal(_logits(loaded), _logits(trained))
    step_2 = cj.load_pretrained(run_dir / "checkpoints" / "2")
    np.testing.assert_array_equal(_logits(step_2), _logits(_trained_model(run_dir, 2)))
    assert not np.array_equal(_logits(step_2), _logits(trained))
    np.testing.assert_array_equal(_logits(cj.load_pretrained(run_dir / "checkpoints" / "3" / "state")),
                                  _logits(trained))
    monkeypatch.chdir(run_dir.parent)             # relative paths, as a user types them
    np.testing.assert_array_equal(_logits(cj.load_pretrained("sft")), _logits(trained))
    np.testing.assert_array_equal(_logits(cj.load_pretrained("sft/checkpoints/2")), _logits(step_2))


def test_export_of_the_run_loads_with_the_trained_logits(run_dir, tmp_path):
    _run("-m", "tools.convert_hf", "to-hf", "--ckpt", "sft", "--out", "sft-hf", "--no-progress", cwd=run_dir.parent)
    exported = cj.load_pretrained(run_dir.parent / "sft-hf")
    np.testing.assert_array_equal(_logits(exported), _logits(_trained_model(run_dir, 3)))
    # a step folder exports too, and an export converts back to a checkpoint with the same logits
    _run("-m", "tools.convert_hf", "to-hf", "--ckpt", str(run_dir / "checkpoints" / "2"), "--out",
         str(tmp_path / "hf2"), "--no-progress")
    np.testing.assert_array_equal(_logits(cj.load_pretrained(tmp_path / "hf2")), _logits(_trained_model(run_dir, 2)))
    _run("-m", "tools.convert_hf", "to-jax", "--hf", str(run_dir.parent / "sft-hf"), "--out", str(tmp_path / "back"),
         "--no-progress")
    np.testing.assert_array_equal(_logits(cj.load_pretrained(tmp_path / "back")), _logits(exported))


def test_a_later_run_starts_from_the_run_directory(run_dir, tmp_path):
    """`model.from_pretrained` pointed at a finished run: the next stage starts from its last step."""
    later = tmp_path / "later"
    _run("-m", "cascade_jax.cli.sft", "--config", RECIPE, *RUN, "train.steps=1", "optimizer.lr=1e-12",
         "optimizer.warmup_steps=0", "moe.bias_update_rate=0", f"model.from_pretrained={run_dir}", f"run_dir={later}")
    start = _logits(_trained_model(run_dir, 3))
    after = _logits(cj.load_pretrained(later))
    np.testing.assert_allclose(after, start, atol=1e-5 * np.abs(start).max())


@pytest.mark.skipif(ref_python() is None, reason=f"no reference Python: {HOW_TO_GET_IT}")
def test_export_of_the_run_runs_in_transformers(run_dir, tmp_path):
    """The reference check (Python 3.11 + transformers) on the export of the real trained run."""
    export = tmp_path / "hf"
    _run("-m", "tools.convert_hf", "to-hf", "--ckpt", str(run_dir), "--out", str(export), "--no-progress")
    ids = np.asarray(TOKENS)
    np.savez(tmp_path / "expected.npz", input_ids=ids, logits=_logits(cj.load_pretrained(export)).astype(np.float32))
    check = subprocess.run([str(ref_python()), os.path.join(REPO, "tests", "reference", "check_export.py"),
                            str(export), "--expect-logits", str(tmp_path / "expected.npz")],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert check.stdout.startswith("ok: ") and "max |Δlogit| = " in check.stdout, check.stdout

