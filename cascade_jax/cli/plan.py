"""cascade-plan: will one SFT train step fit? Compile the run's step ahead of time for N fake devices and
read XLA's memory and cost analysis. Nothing is allocated: the state is abstract (`eval_shape`).

    cascade-plan --config configs/sft/nano-30b-a3b.yaml train.micro_batches=4
    cascade-plan --preset nano-30b-a3b --devices 8 --mesh fsdp=-1 --seq-len 65536 --remat full

The step is the real `train_step` (forward, backward under the remat policy, AdamW update) compiled by
XLA:CPU for the mesh, so buffer sizes are those of the SPMD-partitioned per-device program. Caveats:
XLA:CPU schedules buffers differently from XLA:GPU (treat temporaries as an estimate), and XLA:CPU
expands `ragged_dot` into a dense matmul per expert, so the plan swaps in a stand-in grouped matmul
with the FLOPs and buffers of a real one (rows × one expert's weight).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import tempfile
import time

import jax

from cascade_jax.cli.plan_peak import format_breakdown, read_peak_breakdown
from cascade_jax.cli.plan_step import PlanError, batch_shape, check_model_section, model_config_of, plan_train_step
from cascade_jax.config import ModelConfig
from cascade_jax.ops.attention import BACKEND_NAMES as ATTENTION_BACKENDS
from cascade_jax.parallel.mesh import AXES, MeshConfigError
from cascade_jax.train.config import RunConfigError, SFTConfig, load_sft_config

H200_BYTES = 141e9
DEFAULT_DEVICES = 8   # when the mesh has a -1 axis and --devices is not given

# Without --config the plan starts from the run config's defaults and these (the nano-30b-a3b SFT recipe's
# choices), so the bare flags keep meaning what they always did.
FLAG_DEFAULTS = {
    "model.preset": "nano-30b-a3b", "model.dtype": "bfloat16", "model.remat": "full",
    "model.backends.moe_dispatch": "allgather", "mesh.fsdp": "-1", "data.max_len": "262144",
    "train.loss_chunk_size": "1024",
}

DESCRIPTION = """\
Will one SFT train step fit in device memory? cascade-plan compiles the run's own train step (forward,
backward under the remat policy, AdamW update) ahead of time with XLA:CPU for N fake devices, without
allocating anything, and prints per-device parameter, optimizer, temporary and total bytes from XLA's
memory analysis, FLOPs per token next to 6·N_active, and whether the total fits in --device-memory-gb."""

EPILOG = """\
configuration:
  --config PATH reads the same SFT YAML a run uses (cascade-sft --config PATH), and positional KEY=VALUE
  overrides change it the same way (model.backends.attention=flash mesh.context=8 data.max_len=262144
  train.micro_batches=4 ...). The plan takes from it: the model (model.preset + model.overrides, or the
  config of model.from_pretrained: no weights are read), model.dtype, model.param_dtype, model.remat,
  model.backends, the mesh, data.max_len (tokens per row), data.batch_size (rows per process; global rows
  = data.batch_size x --processes), train.micro_batches, train.loss_chunk_size, the optimizer and
  moe.bias_update_rate. Flags given explicitly win over the file and over the overrides: --preset (which also
  clears model.from_pretrained; model.overrides still apply),
  --seq-len, --micro-batches, --remat, --dtype, --dispatch, --attention, --capacity-factor and --loss-chunk
  set one field each; --mesh replaces the whole mesh (axes not named are 1); --rows sets the global rows.
  Without --config the flags' defaults are those shown (the nano-30b-a3b recipe's choices), with one row
  per batch shard (data x fsdp x expert). --devices defaults to the mesh's product, or 8 when an axis is -1.

caveats:
  XLA:CPU schedules buffers differently from XLA:GPU (treat temporaries as an estimate) and runs bf16
  collectives in fp32; ragged_dot is replaced by a stand-in grouped matmul with a real one's FLOPs and
  buffers (XLA:CPU would expand it into a dense matmul per expert).

examples:
  cascade-plan --config configs/sft/nano-30b-a3b.yaml
  cascade-plan --config configs/sft/nano-30b-a3b.yaml mesh.fsdp=8 mesh.context=8 --processes 8
  cascade-plan --config configs/sft/tiny.yaml data.max_len=128 mesh.fsdp=2
  cascade-plan --preset nano-30b-a3b --devices 8 --mesh context=8 --seq-len 262144 --attention flash
"""


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line (no usage block), naming the flag and what it expects."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=2,expert=4' → {'fsdp': 2, 'expert': 4}; argparse type for --mesh."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected AXIS=SIZE, e.g. fsdp=8")
        if name not in AXES:
            raise argparse.ArgumentTypeError(f"unknown axis {name!r}; expected one of {', '.join(AXES)}")
        if name in sizes:
            raise argparse.ArgumentTypeError(f"axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={value!r}: expected an integer size (-1: the rest)") from None
        if size == 0 or size < -1:
            raise argparse.ArgumentTypeError(f"{name}={size}: expected a positive size or -1 (the rest)")
        sizes[name] = size
    if not sizes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AXIS=SIZE[,AXIS=SIZE...], e.g. fsdp=2,expert=4")
    if sum(size == -1 for size in sizes.values()) > 1:
        raise argparse.ArgumentTypeError("only one axis may be -1")
    return sizes


def _preset(text: str) -> str:
    try:
        ModelConfig.preset(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _override(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a dotted KEY=VALUE override, e.g. mesh.context=8")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cascade-plan", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", type=_override, metavar="KEY=VALUE",
                   help="dotted run-config overrides, e.g. model.backends.attention=flash mesh.context=8")
    p.add_argument("--config", metavar="PATH", help="SFT run config (YAML) to plan, e.g. configs/sft/nano-30b-a3b.yaml")
    p.add_argument("--preset", type=_preset, help="model preset: tiny | nano-30b-a3b (model.preset; default nano-30b-a3b)")
    p.add_argument("--devices", type=_positive_int, metavar="N",
                   help="number of fake devices (default: the mesh's product, or 8 when an axis is -1)")
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="JAX processes of the run; global rows = data.batch_size x N with --config (default 1)")
    p.add_argument("--mesh", type=parse_mesh, metavar="AXIS=SIZE,...",
                   help=f"the whole mesh, e.g. 'fsdp=2,expert=4' (-1: the rest; axes: {', '.join(AXES)}; "
                        "default fsdp=-1)")
    p.add_argument("--seq-len", type=_positive_int, metavar="T", help="tokens per packed row (data.max_len; default 262144)")
    p.add_argument("--rows", type=_positive_int, metavar="B",
                   help="global rows per micro-batch (default: data.batch_size x --processes with --config, "
                        "else one per batch shard)")
    p.add_argument("--micro-batches", type=_positive_int, metavar="A",
                   help="micro-batches per step (train.micro_batches; default 1)")
    p.add_argument("--remat", choices=["none", "full", "dots"], help="remat policy (model.remat; default full)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="compute dtype (model.dtype; default bfloat16; parameters: model.param_dtype)")
    p.add_argument("--dispatch", choices=["local", "allgather", "all_to_all", "ragged_all_to_all"],
                   help="MoE dispatch under the mesh (model.backends.moe_dispatch; default allgather)")
    p.add_argument("--attention", choices=list(ATTENTION_BACKENDS),
                   help="attention backend (model.backends.attention; default auto: xla on CPU, tokamax on GPU)")
    p.add_argument("--capacity-factor", type=_positive_float, metavar="F",
                   help="all_to_all slots per destination as a multiple of the balanced load "
                        "(model.backends.moe_capacity_factor; default: dropless)")
    p.add_argument("--loss-chunk", type=_positive_int, metavar="N",
                   help="tokens per device per lm_head/CE step (train.loss_chunk_size; default 1024)")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="compiler: cpu = XLA:CPU for N fake devices (default, runs anywhere); gpu = XLA:GPU for N "
                        "compile-only GPUs of the attached GPU's kind (needs one GPU; real kernels, no stand-in)")
    p.add_argument("--device-memory-gb", type=_positive_float, default=H200_BYTES / 1e9, metavar="GB",
                   help="memory of one device for the 'fits' line (default 141, an H200)")
    p.add_argument("--explain", type=_count, default=0, metavar="N",
                   help="also list the N operations holding the most memory at the peak (from XLA's dump)")
    return p


def _flag_overrides(args) -> list[str]:
    """The explicitly given flags as run-config overrides (applied last, so they win)."""
    out = []
    if args.preset is not None:
        out += [f"model.preset={args.preset}", "model.from_pretrained=null"]
    if args.mesh is not None:
        out += [f"mesh.{axis}={args.mesh.get(axis, 1)}" for axis in AXES]
    simple = {"seq_len": "data.max_len", "micro_batches": "train.micro_batches", "remat": "model.remat",
              "dtype": "model.dtype", "dispatch": "model.backends.moe_dispatch",
              "attention": "model.backends.attention", "capacity_factor": "model.backends.moe_capacity_factor",
              "loss_chunk": "train.loss_chunk_size"}
    out += [f"{key}={getattr(args, flag)}" for flag, key in simple.items() if getattr(args, flag) is not None]
    return out


def _load(path: str | None, overrides: list[str]) -> SFTConfig:
    """load_sft_config, with every failure as one line naming --config or the key."""
    import yaml

    if path is not None and not os.path.isfile(path):
        raise RunConfigError(f"--config {path}: {'a directory' if os.path.isdir(path) else 'no such file'}; "
                             f"expected an SFT run config (YAML), e.g. configs/sft/tiny.yaml")
    try:
        return load_sft_config(path, overrides)
    except RunConfigError as e:
        message = str(e)
    except yaml.YAMLError as e:
        message = f"{path}: not valid YAML ({str(e).splitlines()[0]})"
    except (ValueError, TypeError) as e:   # a section's own validation
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if path is not None and message.startswith(f"{path}: "):
        message = f"--config {message}"
    raise RunConfigError(message)


@dataclasses.dataclass
class Plan:
    """What main() compiles: the run config, its model config, the device count, the global rows per
    micro-batch and where the config came from (for the report)."""

    run: SFTConfig
    model_config: ModelConfig
    devices: int
    rows: int
    source: str


def resolve(args, parser: argparse.ArgumentParser) -> Plan:
    """Command line → run config + devices; usage mistakes exit through parser.error (one line)."""
    base = [] if args.config else [f"{k}={v}" for k, v in FLAG_DEFAULTS.items()]
    try:
        run = _load(args.config, base + list(args.overrides) + _flag_overrides(args))
    except RunConfigError as e:
        parser.error(str(e))
    sizes = {axis: getattr(run.mesh, axis) for axis in AXES}
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        parser.error(f"mesh.{bad[0]}={sizes[bad[0]]}: expected a positive size or -1 (the rest)")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        parser.error(f"mesh: only one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    named = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1)
    text = f"--mesh {named}" if args.mesh is not None else f"the mesh {named or '(all axes 1: one device)'}"
    devices = args.devices or (DEFAULT_DEVICES if free else fixed)
    if free and devices % fixed:
        parser.error(f"--devices {devices}: {text} needs a multiple of {fixed} devices")
    if not free and devices != fixed:
        parser.error(f"--devices {devices}: {text} needs exactly {fixed} device{'s' if fixed > 1 else ''} "
                     f"(leave --devices out, or change the mesh)")
    if devices % args.processes:
        parser.error(f"--processes {args.processes}: does not divide the {devices} devices")
    try:
        mesh_shape = run.mesh.sizes(devices)
    except MeshConfigError as e:
        parser.error(str(e))
    rows = args.rows
    if rows is None and args.config:
        rows = run.data.batch_size * args.processes
    try:
        model_config = model_config_of(run.model)
        check_model_section(run.model)
        rows = batch_shape(run, mesh_shape, rows)[1]
    except PlanError as e:
        parser.error(str(e))
    source = args.config or ""
    if args.overrides:
        source = " ".join(([source] if source else []) + list(args.overrides))
    return Plan(run=run, model_config=model_config, devices=devices, rows=rows, source=source)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.target == "cpu":
        # The plan compiles for fake CPU devices; their count (XLA_FLAGS) is read when the CPU backend starts,
        # which nothing before jax.device_count() below does.
        jax.config.update("jax_platforms", "cpu")
        os.environ["JAX_PLATFORMS"] = "cpu"
    plan = resolve(args, parser)
    with tempfile.TemporaryDirectory(prefix="cascade-plan-") as dump_dir:
        flags = f" --xla_force_host_platform_device_count={plan.devices}" if args.target == "cpu" else ""
        if args.explain:
            flags += f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*train_step.*"
        kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = (kept + flags).strip()
        devices, error = _target_devices(args.target, plan.devices)
        if error:
            print(f"cascade-plan: error: {error}", file=sys.stderr)
            return 1
        start = time.perf_counter()
        try:
            report = plan_train_step(plan.run, rows=plan.rows, model_config=plan.model_config, devices=devices)
        except ValueError as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"cascade-plan: error: {message}", file=sys.stderr)
            return 1
        report["source"] = plan.source
        print(format_report(report, args.device_memory_gb * 1e9, time.perf_counter() - start))
        if args.explain:
            print(format_breakdown(read_peak_breakdown(dump_dir), args.explain))
    return 0


def _target_devices(target: str, count: int) -> tuple[list | None, str | None]:
    """(devices to compile for, None) or (None, why not): fake CPU devices, or compile-only GPUs that take
    the attached GPU's target (so XLA:GPU compiles one device's program of a mesh larger than the machine)."""
    if target == "cpu":
        if jax.device_count() != count:
            return None, (f"JAX already started in this process with {jax.device_count()} devices, the plan needs "
                          f"{count}; run cascade-plan in a fresh process")
        return None, None
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None, "--target gpu needs a GPU in this process (jax.devices('gpu') found none)"
    from jax._src.lib import xla_client
    from jax.experimental import topologies

    target_config = xla_client.get_topology_for_devices(gpus[:1]).target_config
    topology = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}", target_config=target_config)
    return list(topology.devices), None


def format_count(n: float) -> str:
    """Parameter counts: billions for large models (31.58B), millions for small ones (1.77M)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n: float) -> str:
    return f"{n / 1e9:9.2f} GB" if n >= 1e8 else f"{n / 1e6:9.2f} MB"


def _flops(n: float) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"


def format_report(r: dict, device_bytes: float, seconds: float) -> str:
    fits = r["total_bytes"] <= device_bytes
    mesh = ",".join(f"{a}={s}" for a, s in r["mesh"].items()) or "none"
    lines = [
        f"model {r['name']}: {format_count(r['params'])} parameters, {format_count(r['active_params'])} active",
        *([f"run config: {r['source']}"] if r.get("source") else []),
        f"mesh {mesh} on {_plural(r['devices'], 'device')}; {_plural(r['rows'], 'row')} × {r['seq_len']} tokens × "
        f"{_plural(r['micro_batches'], 'micro-batch', 'es')}; remat={r['remat']}, compute {r['dtype']}, "
        f"attention={r['attention']}, dispatch={r['dispatch']}"
        + ((f" (capacity factor {r['capacity_factor']})" if r["capacity_factor"] else " (dropless)")
           if r["dispatch"] == "all_to_all" else "")
        + f", loss chunk {r['loss_chunk']}",
        "per device:",
        f"  parameters ({r['param_dtype']})".ljust(27) + _bytes(r["param_bytes"]),
        f"  optimizer state (Adam)   {_bytes(r['opt_bytes'])}",
        f"  arguments (XLA)          {_bytes(r['argument_bytes'])}",
        f"  activations/temporaries  {_bytes(r['temp_bytes'])}",
        f"  outputs not aliased      {_bytes(r['output_bytes'] - r['alias_bytes'])}",
        f"  total                    {_bytes(r['total_bytes'])}",
        f"FLOPs per token: XLA {_flops(r['flops_per_token'])} (of one micro-batch; inner loop bodies counted once) "
        f"vs 6·N_active "
        f"{_flops(r['six_n_active'])} (+ attention {_flops(r['attention_flops'])})",
        f"fits in {device_bytes / 1e9:.0f} GB: {'yes' if fits else 'NO'}  (compiled by {r['compiler']} in {seconds:.0f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
