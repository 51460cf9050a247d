"""cascade-plan on the tiny preset: the compiled step's state bytes match the model config, run configs and
flags plan the same step, and every usage mistake is one line naming the flag."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from cascade_jax.cli import plan
from cascade_jax.cli.plan_step import PlanError, plan_train_step
from cascade_jax.config import ModelConfig
from cascade_jax.model.layers import ExpertBias
from cascade_jax.model.nemotron_h import NemotronH
from cascade_jax.parallel.mesh import AXES
from cascade_jax.train.config import load_sft_config

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "sft" / "tiny.yaml")
TINY = ["model.preset=tiny", "model.dtype=float32", "model.remat=full", "model.backends.moe_dispatch=allgather",
        "data.max_len=128", "train.loss_chunk_size=64"]


def _plan(*overrides, rows=None):
    return plan_train_step(load_sft_config(None, TINY + list(overrides)), rows=rows)


@pytest.fixture(scope="module")
def replicated_and_sharded():
    # data=8 replicates the state on every device; fsdp=8 splits every matrix along its hidden (embed) axis.
    return _plan("mesh.data=8"), _plan("mesh.fsdp=8")


def _tiny_variables():
    """(size, logical axes, is a router-correction bias) of every model variable, from the unsharded model."""
    config = ModelConfig.preset("tiny")
    model = nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0)))
    out = []
    for _, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("logical_axes") or ()
        out.append((math.prod(var.get_value().shape), tuple(names), isinstance(var, ExpertBias)))
    return config, out


def test_state_bytes_match_the_model_config(replicated_and_sharded):
    one, eight = replicated_and_sharded
    config, variables = _tiny_variables()
    moe_layers = config.layer_pattern.count("E")
    n = config.num_params()
    # Replicated: every fp32 parameter whole, plus the router-correction biases num_params leaves out.
    assert one["param_bytes"] == 4 * (n + moe_layers * config.n_routed_experts)
    # Adam: first and second moments of every trained parameter (not of the biases) + a few int32 counters.
    counters = one["opt_bytes"] - 2 * 4 * n
    assert 0 < counters <= 4 * 4
    # fsdp=8: a variable with an `embed` (hidden) axis keeps 1/8 of itself; the others (Mamba head vectors,
    # conv biases, router biases) stay whole on every device.
    assert config.hidden_size % 8 == 0
    split = sum(size for size, names, _ in variables if "embed" in names)
    whole = sum(size for size, names, _ in variables if "embed" not in names)
    trained_whole = sum(size for size, names, bias in variables if "embed" not in names and not bias)
    assert split + whole == n + moe_layers * config.n_routed_experts
    assert eight["param_bytes"] == 4 * (split // 8 + whole)
    assert eight["opt_bytes"] == 2 * 4 * (split // 8 + trained_whole) + counters
    assert eight["param_bytes"] < one["param_bytes"] / 6


def test_step_memory_covers_its_state(replicated_and_sharded):
    for r in replicated_and_sharded:
        assert r["argument_bytes"] >= r["param_bytes"] + r["opt_bytes"]   # state + batch go in
        assert r["total_bytes"] >= r["argument_bytes"] and r["temp_bytes"] > 0
        assert r["rows"] == 8 and r["devices"] == 8   # one row per batch shard by default
    one, eight = replicated_and_sharded
    assert one["mesh"] == {"data": 8} and eight["mesh"] == {"fsdp": 8}
    # XLA's FLOPs per token are those of a training step: at least the 6·N_active matmul estimate's order.
    assert 0.3 * one["six_n_active"] < one["flops_per_token"] < 5 * one["six_n_active"]
    text = plan.format_report(eight, 141e9, 1.0)
    assert "fits in 141 GB: yes" in text and "model tiny: 1.77M parameters" in text


def test_micro_batches_keep_the_state_and_the_per_token_flops(replicated_and_sharded):
    _, eight = replicated_and_sharded
    two = _plan("mesh.fsdp=8", "train.micro_batches=2")
    assert two["micro_batches"] == 2
    assert (two["param_bytes"], two["opt_bytes"]) == (eight["param_bytes"], eight["opt_bytes"])
    assert two["argument_bytes"] > eight["argument_bytes"]   # the batch is twice as large
    # The scan over micro-batches is counted once by XLA: FLOPs per token are those of one micro-batch.
    assert two["flops_per_token"] == pytest.approx(eight["flops_per_token"], rel=0.05)


def test_plan_rejects_a_mesh_that_does_not_divide():
    with pytest.raises(ValueError):
        _plan("mesh.fsdp=3")   # 8 devices in this process


def test_plan_rejects_rows_that_do_not_split():
    with pytest.raises(PlanError, match="4 rows per micro-batch do not split over the 8 batch shards"):
        _plan("mesh.fsdp=8", rows=4)


def _report_lines(text):
    """The per-device byte lines and FLOPs line of a printed report (header and timing left out)."""
    lines = text.splitlines()
    return [line for line in lines[lines.index("per device:"):] if not line.startswith("fits in")]


def test_config_plans_the_same_step_as_the_equivalent_flags(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))   # main() rewrites it; restore after
    flags = ["--preset", "tiny", "--devices", "8", "--mesh", "fsdp=8", "--seq-len", "128", "--rows", "8",
             "--remat", "full", "--dtype", "float32", "--dispatch", "allgather", "--loss-chunk", "64"]
    assert plan.main(flags) == 0
    from_flags = capsys.readouterr().out
    config = ["--config", TINY_YAML, "mesh.fsdp=8", "data.max_len=128", "data.batch_size=8", "model.remat=full",
              "model.backends.moe_dispatch=allgather", "train.loss_chunk_size=64"]
    assert plan.main(config) == 0
    from_config = capsys.readouterr().out
    assert _report_lines(from_config) == _report_lines(from_flags)
    assert "mesh fsdp=8 on 8 devices; 8 rows × 128 tokens × 1 micro-batch;" in from_config
    assert f"\nrun config: {TINY_YAML} mesh.fsdp=8 data.max_len=128" in from_config
    assert "run config" not in from_flags


def _parse(*argv):
    parser = plan.build_parser()
    return plan.resolve(parser.parse_intermixed_args(list(argv)), parser)


def test_config_sections_reach_the_plan_and_flags_win():
    p = _parse("--config", TINY_YAML, "mesh.fsdp=2", "model.backends.attention=flash", "train.micro_batches=3",
               "data.max_len=256", "--processes", "2")
    assert p.devices == 2 and p.rows == 4 * 2   # data.batch_size (per process) × processes
    assert p.run.model.backends.attention == "flash" and p.run.train.micro_batches == 3
    assert p.run.data.max_len == 256 and p.model_config == ModelConfig.preset("tiny")
    # Explicit flags win over the file and over the overrides; --mesh replaces the whole mesh.
    p = _parse("--config", TINY_YAML, "mesh.fsdp=2", "--mesh", "expert=4", "--seq-len", "64", "--attention", "xla",
               "data.max_len=256", "--rows", "8", "--micro-batches", "2", "--capacity-factor", "1.25")
    assert (p.run.mesh.fsdp, p.run.mesh.expert, p.devices, p.rows) == (1, 4, 4, 8)
    assert p.run.data.max_len == 64 and p.run.model.backends.attention == "xla" and p.run.train.micro_batches == 2
    assert p.run.model.backends.moe_capacity_factor == 1.25
    # A -1 axis takes what --devices leaves (8 by default); without --config rows follow the batch shards.
    p = _parse("--preset", "tiny", "--mesh", "fsdp=-1,context=2")
    assert p.devices == 8 and p.run.mesh.sizes(p.devices)["fsdp"] == 4 and p.rows == 4


def test_from_pretrained_reads_only_the_config(fixtures_dir):
    hf = fixtures_dir / "hf" / "dense_attn_mamba"
    p = _parse("--config", TINY_YAML, f"model.from_pretrained={hf}", "data.max_len=128")
    assert p.model_config == ModelConfig.from_hf(hf)


@pytest.mark.parametrize("argv, expected", [
    (["--mesh", "bogus=8"], "argument --mesh: unknown axis 'bogus'; expected one of " + ", ".join(AXES)),
    (["--mesh", "fsdp=abc"], "argument --mesh: fsdp='abc': expected an integer size"),
    (["--mesh", "fsdp=0"], "argument --mesh: fsdp=0: expected a positive size or -1"),
    (["--mesh", "fsdp=-1,expert=-1"], "argument --mesh: only one axis may be -1"),
    (["--devices", "0"], "argument --devices: expected a positive integer, got 0"),
    (["--devices", "-2"], "argument --devices: expected a positive integer, got -2"),
    (["--mesh", "fsdp=8", "--devices", "4"], "--devices 4: --mesh fsdp=8 needs exactly 8 devices"),
    (["--mesh", "fsdp=-1,expert=3", "--devices", "8"], "--devices 8: --mesh fsdp=-1,expert=3 needs a multiple of 3"),
    (["--preset", "huge"], "argument --preset: unknown preset 'huge'; expected one of"),
    (["--config", "no/such.yaml"], "--config no/such.yaml: no such file; expected an SFT run config"),
    (["--config", str(ROOT / "README.md")], f"--config {ROOT / 'README.md'}: not valid YAML"),
    (["--config", TINY_YAML, "mesh.fsdp=abc"], "mesh.fsdp: Value 'abc'"),
    (["--config", TINY_YAML, "model.bogus=1"], "model.bogus: Key 'bogus' not in 'ModelSection'"),
    (["--config", TINY_YAML, "fsdp"], "argument KEY=VALUE: 'fsdp': expected a dotted KEY=VALUE override"),
    (["--config", TINY_YAML, "mesh.fsdp=2", "--devices", "4"], "--devices 4: the mesh fsdp=2 needs exactly 2"),
    (["--config", TINY_YAML, "mesh.fsdp=8", "data.batch_size=3"], "3 rows per micro-batch do not split over the 8"),
    (["--config", TINY_YAML, "mesh.context=8", "data.max_len=100"], "data.max_len=100 does not split over mesh.context=8"),
    (["--config", TINY_YAML, "model.from_pretrained=/no/such/dir"], "model.from_pretrained=/no/such/dir: "),
    (["--config", TINY_YAML, "model.backends.grouped_matmul=nope"], "model.backends.grouped_matmul='nope': expected"),
    (["--processes", "3"], "--processes 3: does not divide the 8 devices"),
])
def test_usage_mistakes_are_one_line_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cascade-plan: error: ") and expected in err, err


def test_help_describes_the_tool_in_whole_sentences():
    text = plan.build_parser().format_help()
    assert plan.DESCRIPTION in text   # verbatim, not its first line cut off
    assert plan.DESCRIPTION.rstrip().endswith(".") and "fake devices" in plan.DESCRIPTION
    assert "cascade-plan --config configs/sft/nano-30b-a3b.yaml" in text and "--config PATH" in text
    for paragraph in plan.EPILOG.split("\n\n")[:2]:   # configuration, caveats: prose ending in a full stop
        assert paragraph.rstrip().endswith("."), paragraph


def test_parameter_counts_print_in_millions_or_billions():
    assert plan.format_count(1_770_000) == "1.77M"
    assert plan.format_count(952_580) == "0.95M"
    assert plan.format_count(31_577_937_344) == "31.58B"


def test_cascade_plan_config_end_to_end_on_two_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "cascade_jax.cli.plan", "--config", TINY_YAML, "--devices", "2",
                           "mesh.fsdp=2", "data.max_len=128", "train.loss_chunk_size=128"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    params = ModelConfig.preset("tiny").num_params()
    assert out.startswith(f"model tiny: {params / 1e6:.2f}M parameters"), out
    assert "mesh fsdp=2 on 2 devices; 4 rows × 128 tokens × 1 micro-batch; remat=none, compute float32" in out
    assert "parameters (float32)" in out and "fits in 141 GB: yes" in out



def test_gpu_target_without_a_gpu_says_so_in_one_line():
    done = subprocess.run([sys.executable, "-m", "cascade_jax.cli.plan", "--preset", "tiny", "--target", "gpu",
                           "--seq-len", "128", "--devices", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1
    assert done.stderr.strip() == ("cascade-plan: error: --target gpu needs a GPU in this process "
                                   "(jax.devices('gpu') found none)")
