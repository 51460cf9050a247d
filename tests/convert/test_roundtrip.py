"""HF → Orbax → HF is bit-exact, and the Orbax checkpoint loads and gives the fixture logits."""

import json

import numpy as np
import pytest

import cascade_jax as cj
from tests.convert.helpers import FIXTURES, assert_logits_match, read_all
from tools.convert_hf.to_hf import convert_to_hf
from tools.convert_hf.to_jax import convert_to_jax


@pytest.mark.parametrize("name", FIXTURES)
def test_hf_to_jax_to_hf_is_bit_exact(fixtures_dir, tmp_path, name):
    source = fixtures_dir / "hf" / name
    convert_to_jax(source, tmp_path / "ckpt", progress=False)
    summary = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=60_000, progress=False)
    assert summary.startswith("to-hf: ") and "GB/s" in summary

    assert read_all(tmp_path / "hf") == read_all(source)          # names, dtypes, shapes, bytes
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1              # really sharded
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == "nemotron_h"
    assert exported["hybrid_override_pattern"] == cj.ModelConfig.from_hf(source).layer_pattern
    assert cj.ModelConfig.from_hf(tmp_path / "hf") == cj.ModelConfig.from_hf(source)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == json.loads((source / "generation_config.json").read_text())

    assert_logits_match(cj.load_pretrained(tmp_path / "ckpt"), source)


def test_single_file_export_and_bfloat16(fixtures_dir, tmp_path):
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    convert_to_jax(source, tmp_path / "ckpt", dtype=_bf16(), progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tensors = read_all(tmp_path / "hf")
    assert set(tensors) == set(read_all(source))
    for name, (dtype, _, _) in tensors.items():
        fp32 = name.rsplit(".", 1)[-1] in ("A_log", "D", "e_score_correction_bias")
        assert dtype == ("F32" if fp32 else "BF16"), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = cj.load_pretrained(tmp_path / "hf")
    assert model.layers[0].mixer.in_proj.kernel[...].dtype == _bf16()
    assert model.layers[0].mixer.A_log[...].dtype == np.float32


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _no_constants(name):
    raise ValueError(f"bare {name} in strict JSON")


def test_exported_config_is_strict_json(fixtures_dir, tmp_path):
    """inf is written as transformers writes it ({"__float__": "Infinity"}), never a bare Infinity, and
    reads back, as does the bare form Python's json writes."""
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    convert_to_jax(source, tmp_path / "ckpt", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    for name in ("config.json", "generation_config.json"):
        json.loads((tmp_path / "hf" / name).read_text(), parse_constant=_no_constants)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text(), parse_constant=_no_constants)
    fixture = json.loads((source / "config.json").read_text(), parse_constant=_no_constants)
    assert exported["time_step_limit"] == fixture["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    config = cj.ModelConfig.from_hf(tmp_path / "hf")
    assert config == cj.ModelConfig.from_hf(source) and config.time_step_limit == (0.0, float("inf"))
    bare = tmp_path / "bare" / "config.json"
    bare.parent.mkdir()
    bare.write_text(json.dumps(config.to_hf()))
    assert "Infinity" in bare.read_text() and cj.ModelConfig.from_hf(bare) == config


def test_hf_json_text_special_floats():
    from cascade_jax.config import hf_json_text

    text = hf_json_text({"b": [float("-inf"), 1.5, float("nan")], "a": {"c": float("inf")}})
    assert json.loads(text, parse_constant=_no_constants) == {
        "a": {"c": {"__float__": "Infinity"}}, "b": [{"__float__": "-Infinity"}, 1.5, {"__float__": "NaN"}]}
    assert text.startswith('{\n  "a"') and text.endswith("}\n")
    config = cj.ModelConfig.from_hf(json.loads(hf_json_text(cj.ModelConfig.preset("tiny").to_hf()
                                                            | {"time_step_limit": [0.0, 5.0]})))
    assert config.time_step_limit == (0.0, 5.0)
