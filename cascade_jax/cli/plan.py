"""cascade-plan: will one SFT train step fit? Compile it ahead of time for N fake devices and read XLA's
memory and cost analysis. Nothing is allocated: the state is abstract (`eval_shape`).

    cascade-plan --preset nano-30b-a3b --devices 8 --mesh fsdp=-1 --seq-len 65536 --remat full

The step is the real `train_step` (forward, backward under the remat policy, AdamW update) compiled by
XLA:CPU for the mesh, so buffer sizes are those of the SPMD-partitioned per-device program. Caveats:
XLA:CPU schedules buffers differently from XLA:GPU (treat temporaries as an estimate), and XLA:CPU
expands `ragged_dot` into a dense matmul per expert, so the plan swaps in a stand-in grouped matmul
with the FLOPs and buffers of a real one (rows × one expert's weight).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

H200_BYTES = 141e9


def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        sizes[name.strip()] = int(value)
    return sizes


def _args(argv):
    p = argparse.ArgumentParser(prog="cascade-plan", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano-30b-a3b")
    p.add_argument("--devices", type=int, default=8, help="number of (fake) devices in the mesh")
    p.add_argument("--mesh", default="fsdp=-1", help="axis sizes, e.g. 'fsdp=2,expert=4' (-1: the rest)")
    p.add_argument("--seq-len", type=int, default=262144, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=0, help="rows per micro-batch, global (default: one per batch shard)")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters and Adam stay fp32)")
    p.add_argument("--dispatch", default="allgather", help="moe_dispatch under the mesh")
    p.add_argument("--attention", default="xla", help="attention backend: xla | flash")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="all_to_all slots per destination as a multiple of the balanced load (default: dropless)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per device per lm_head/CE step")
    p.add_argument("--device-memory-gb", type=float, default=H200_BYTES / 1e9)
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="also list the N operations holding the most memory at the peak (from XLA's dump)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="cascade-plan-") as dump_dir:
        # Fake devices (and the dump) must be requested before JAX starts its CPU backend.
        flags = f" --xla_force_host_platform_device_count={args.devices}"
        if args.explain:
            flags += f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*train_step.*"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        from cascade_jax.cli.plan_peak import format_breakdown, read_peak_breakdown
        from cascade_jax.cli.plan_step import plan_train_step

        start = time.perf_counter()
        try:
            report = plan_train_step(preset=args.preset, mesh_sizes=_parse_mesh(args.mesh), seq_len=args.seq_len,
                                     rows=args.rows, micro_batches=args.micro_batches, remat=args.remat,
                                     dtype=args.dtype, dispatch=args.dispatch, loss_chunk=args.loss_chunk,
                                     capacity_factor=args.capacity_factor, attention=args.attention)
        except ValueError as e:
            print(f"cascade-plan: error: {e}", file=sys.stderr)
            return 1
        print(format_report(report, args.device_memory_gb * 1e9, time.perf_counter() - start))
        if args.explain:
            print(format_breakdown(read_peak_breakdown(dump_dir), args.explain))
    return 0


def format_report(r: dict, device_bytes: float, seconds: float) -> str:
    gb = lambda b: f"{b / 1e9:9.2f} GB"  # noqa: E731
    fits = r["total_bytes"] <= device_bytes
    lines = [
        f"model {r['preset']}: {r['params'] / 1e9:.2f}B parameters, {r['active_params'] / 1e9:.2f}B active",
        f"mesh {r['mesh']} on {r['devices']} devices; {r['rows']} rows × {r['seq_len']} tokens × "
        f"{r['micro_batches']} micro-batches; remat={r['remat']}, compute {r['dtype']}, attention={r['attention']}, dispatch={r['dispatch']}"
        + (f" (capacity factor {r['capacity_factor']})" if r["capacity_factor"] else " (dropless)"),
        "per device:",
        f"  parameters (fp32)        {gb(r['param_bytes'])}",
        f"  optimizer state (Adam)   {gb(r['opt_bytes'])}",
        f"  arguments (XLA)          {gb(r['argument_bytes'])}",
        f"  activations/temporaries  {gb(r['temp_bytes'])}",
        f"  outputs not aliased      {gb(r['output_bytes'] - r['alias_bytes'])}",
        f"  total                    {gb(r['total_bytes'])}",
        f"FLOPs per token: XLA {r['flops_per_token'] / 1e9:.2f} G (loop bodies counted once) vs 6·N_active "
        f"{r['six_n_active'] / 1e9:.2f} G (+ attention {r['attention_flops'] / 1e9:.2f} G)",
        f"fits in {device_bytes / 1e9:.0f} GB: {'yes' if fits else 'NO'}  (compiled in {seconds:.0f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
