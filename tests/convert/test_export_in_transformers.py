"""An export of changed ("trained") weights loads in transformers and gives cascade_jax's logits, checked by
tests/reference/check_export.py in the reference Python (skipped without it: scripts/setup_reference.sh)."""

import os
import subprocess

import numpy as np
import pytest

import cascade_jax as cj
from tests.reference.ref_python import HOW_TO_GET_IT, ROOT, ref_python
from tools.convert_hf.to_hf import convert_to_hf
from tools.convert_hf.to_jax import convert_to_jax

REF_PYTHON = ref_python()
CHECK = ROOT / "tests" / "reference" / "check_export.py"
pytestmark = pytest.mark.skipif(REF_PYTHON is None, reason=f"no reference Python: {HOW_TO_GET_IT}")


def _check(*args):
    result = subprocess.run([REF_PYTHON, CHECK, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    print(result.stdout, result.stderr[-2000:])   # shown by pytest on failure, and with -s
    return result


def test_trained_export_matches_cascade_logits(fixtures_dir, tmp_path, rewrite_checkpoint):
    fixture = fixtures_dir / "hf" / "mamba_moe_attn"
    trained = tmp_path / "trained"
    convert_to_jax(fixture, tmp_path / "fixture_ckpt", progress=False)
    convert_to_hf(tmp_path / "fixture_ckpt", trained, progress=False)   # the same weights, then changed:
    rng = np.random.default_rng(0)
    rewrite_checkpoint(trained, lambda tensors: tensors.update(
        {name: (t * (1 + 0.1 * rng.standard_normal(t.shape))).astype(t.dtype) for name, t in tensors.items()}))
    convert_to_jax(trained, tmp_path / "ckpt", progress=False)
    export = tmp_path / "export"
    convert_to_hf(tmp_path / "ckpt", export, progress=False)

    ids = rng.integers(0, cj.ModelConfig.from_hf(export).vocab_size, (2, 16)).astype(np.int32)
    logits = np.asarray(cj.load_pretrained(export)(ids).logits, np.float32)
    untrained = np.asarray(cj.load_pretrained(fixture)(ids).logits)
    assert np.abs(logits - untrained).max() > 1e-2 * np.abs(untrained).max()   # really other weights
    np.savez(tmp_path / "expect.npz", input_ids=ids, logits=logits)

    result = _check(export, fixture, "--expect-logits", tmp_path / "expect.npz")
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip()
    assert line.startswith("ok: ") and "NemotronHForCausalLM" in line and "max |Δlogit| = " in line, line

    np.savez(tmp_path / "wrong.npz", input_ids=ids, logits=logits + 0.05 * np.abs(logits).max())
    wrong = _check(export, "--expect-logits", tmp_path / "wrong.npz")
    assert wrong.returncode == 1 and wrong.stdout.startswith("FAIL: ") and "max |Δlogit|" in wrong.stdout, wrong


def test_fixture_mode_still_works(fixtures_dir, tmp_path):
    fixture = fixtures_dir / "hf" / "mamba_moe_attn"
    convert_to_jax(fixture, tmp_path / "ckpt", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=60_000, progress=False)
    result = _check(tmp_path / "hf", fixture)
    assert result.returncode == 0 and result.stdout.startswith("ok: ") and "0 differ" in result.stdout, result
