"""The SFT loop on a mesh: same losses as one device, real dropped-token counts, sharded resume."""

import json
import os

import pytest

from cascade_jax.train.config import load_sft_config
from cascade_jax.train.sft import run_sft

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft", "tiny.yaml")
SMALL = [
    "model.overrides={hidden_size: 64, layer_pattern: 'ME*M', num_attention_heads: 2, head_dim: 16, "
    "mamba_num_heads: 4, mamba_head_dim: 16, n_routed_experts: 4, moe_intermediate_size: 32, "
    "moe_shared_expert_intermediate_size: 32}",
    "data.max_len=128", "data.batch_size=4", "train.log_every=1", "train.eval_every=0",
    "train.accuracy_eval_every=0", "train.eval_data=null", "optimizer.warmup_steps=2", "optimizer.lr=3e-3",
    "checkpoint.every=2", "checkpoint.async_save=false",
]
MESH = ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", "model.backends.moe_dispatch=all_to_all"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_mesh_run_matches_one_device_and_resumes(tmp_path):
    run_sft(load_sft_config(RECIPE, SMALL + [f"run_dir={tmp_path / 'one'}", "train.steps=3"]))
    run_sft(load_sft_config(RECIPE, SMALL + MESH + [f"run_dir={tmp_path / 'mesh'}", "train.steps=2"]))
    run_sft(load_sft_config(RECIPE, SMALL + MESH + [f"run_dir={tmp_path / 'mesh'}", "train.steps=3",
                                                   "allow_config_change=true"]))  # resumes, to a longer run
    one, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
    for step in (1, 2, 3):
        assert abs(mesh[step]["loss"] - one[step]["loss"]) <= 1e-4 * one[step]["loss"], (step, mesh, one)
        assert mesh[step]["dropped_tokens"] == 0


@pytest.mark.slow
def test_capacity_factor_reports_dropped_tokens(tmp_path):
    run_sft(load_sft_config(RECIPE, SMALL + MESH + [f"run_dir={tmp_path}", "train.steps=1",
                                                   "model.backends.moe_capacity_factor=0.5"]))
    assert _metrics(tmp_path)[1]["dropped_tokens"] > 0


@pytest.mark.slow
def test_context_parallel_run_matches_one_device(tmp_path):
    """Rows split over context=4 (conv halo, SSD state passing, gathered KV through flash attention)."""
    context = ["mesh.fsdp=2", "mesh.context=4", "model.backends.moe_dispatch=allgather", "model.backends.attention=flash"]
    run_sft(load_sft_config(RECIPE, SMALL + [f"run_dir={tmp_path / 'one'}", "train.steps=2"]))
    run_sft(load_sft_config(RECIPE, SMALL + context + [f"run_dir={tmp_path / 'cp'}", "train.steps=2"]))
    one, cp = _metrics(tmp_path / "one"), _metrics(tmp_path / "cp")
    for step in (1, 2):
        assert abs(cp[step]["loss"] - one[step]["loss"]) <= 1e-4 * one[step]["loss"], (step, cp, one)
