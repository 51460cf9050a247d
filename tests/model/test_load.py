"""load_pretrained on good and bad HF directories."""


import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import cascade_jax as cj


def test_sharded_checkpoint_with_index_and_model_prefix(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        # transformers-internal spelling (model.*) is accepted too
        renamed = {k.replace("backbone.", "model.", 1): tensors[k] for k in keys}
        save_file(renamed, hf_dir / file)
        weight_map.update({k: file for k in renamed})
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(__import__("json").dumps({"weight_map": weight_map}))
    ids = np.load(hf_dir / "inputs.npy")
    expected = np.load(hf_dir / "logits.npy")
    logits = np.asarray(cj.load_pretrained(hf_dir)(ids).logits)
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_missing_tensor(hf_dir, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.pop("backbone.layers.2.mixer.D"))
    with pytest.raises(cj.CheckpointError, match="missing tensor backbone.layers.2.mixer.D"):
        cj.load_pretrained(hf_dir)


def test_unexpected_tensor(hf_dir, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}))
    with pytest.raises(cj.CheckpointError, match="unexpected tensor backbone.layers.0.mixer.extra"):
        cj.load_pretrained(hf_dir)
    assert cj.load_pretrained(hf_dir, strict=False) is not None


def test_wrong_shape(hf_dir, rewrite_checkpoint):
    rewrite_checkpoint(hf_dir, lambda t: t.update({"backbone.norm_f.weight": np.ones(5, np.float32)}))
    with pytest.raises(cj.CheckpointError, match=r"backbone.norm_f.weight: shape \(5,\), expected \(32,\)"):
        cj.load_pretrained(hf_dir)


def test_corrupt_file_and_missing_config(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(cj.CheckpointError, match="not a readable safetensors file"):
        cj.load_pretrained(hf_dir)
    with pytest.raises(cj.CheckpointError, match="neither an HF model directory"):
        cj.load_pretrained(tmp_path)
