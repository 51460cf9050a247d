"""Chunked SSD scan vs the per-token recurrence (both jitted, fp32, CPU).

Times `cascade_jax.ops.ssd.ssd_chunked` against `ssd_reference` (a lax.scan over tokens) at Nano-like
per-head shapes with few heads, forward only and forward+backward (gradient of sum(y) w.r.t. x, dt, A, B, C),
and checks they agree (max abs difference of y, the final state and every gradient). Measurements of the
two alternate (the machine is shared); medians are reported. Compile time is excluded.

    .venv/bin/python benchmarks/ssd_scan.py [--seq-len 4096 --heads 8 --head-dim 64 --groups 1 --state 128 --chunk 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cascade_jax.ops.ssd import ssd_chunked, ssd_reference  # noqa: E402


def make_inputs(args):
    ks = jax.random.split(jax.random.key(0), 5)
    b, t, h, g = args.batch, args.seq_len, args.heads, args.groups
    x = jax.random.normal(ks[0], (b, t, h, args.head_dim), jnp.float32)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 4.0)            # Δ ≈ 0.002 .. 0.1
    A = -jnp.arange(1, h + 1, dtype=jnp.float32)                               # -exp(A_log) as initialized
    B = jax.random.normal(ks[2], (b, t, g, args.state), jnp.float32) / args.state ** 0.5
    C = jax.random.normal(ks[3], (b, t, g, args.state), jnp.float32) / args.state ** 0.5
    return x, dt, A, B, C


def timer(fn, inputs):
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        return time.perf_counter() - t0
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--state", type=int, default=128)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed calls per function (alternating)")
    args = p.parse_args()
    print(f"shapes: batch={args.batch} T={args.seq_len} heads={args.heads} head_dim={args.head_dim} "
          f"n_groups={args.groups} state={args.state} chunk={args.chunk} fp32; cores={os.cpu_count()}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    inputs = make_inputs(args)

    def chunked(*a):
        return ssd_chunked(*a, chunk_size=args.chunk)

    def grad_of(fn):
        return jax.grad(lambda *a: fn(*a)[0].sum(), argnums=(0, 1, 2, 3, 4))

    fns = {"chunked fwd": jax.jit(chunked), "reference fwd": jax.jit(ssd_reference),
           "chunked fwd+bwd": jax.jit(grad_of(chunked)), "reference fwd+bwd": jax.jit(grad_of(ssd_reference))}
    compiled, outs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled[name] = fn.lower(*inputs).compile()
        outs[name] = jax.block_until_ready(compiled[name](*inputs))
        print(f"compile {name:18s} {time.perf_counter() - t0:6.2f} s (excluded)")

    def maxdiff(a, b):
        return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    (y_c, s_c), (y_r, s_r) = outs["chunked fwd"], outs["reference fwd"]
    print(f"max |y_chunked - y_reference|        = {maxdiff(y_c, y_r):.3e}  (max |y| = {float(jnp.abs(y_r).max()):.3e})")
    print(f"max |state_chunked - state_reference| = {maxdiff(s_c, s_r):.3e}")
    for arg, gc, gr in zip(("x", "dt", "A", "B", "C"), outs["chunked fwd+bwd"], outs["reference fwd+bwd"]):
        print(f"max |d{arg}_chunked - d{arg}_reference| = {maxdiff(gc, gr):.3e}  (max |d{arg}| = "
              f"{float(jnp.abs(gr).max()):.3e})")

    runs = {name: timer(c, inputs) for name, c in compiled.items()}
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            times[name].append(run())
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq_len
    for name, t in times.items():
        print(f"{name:18s} median {med[name] * 1e3:9.2f} ms  best {min(t) * 1e3:9.2f} ms  "
              f"-> {tokens / med[name] / 1e3:8.1f} k tokens/s")
    fwd = med["reference fwd"] / med["chunked fwd"]
    bwd = med["reference fwd+bwd"] / med["chunked fwd+bwd"]
    print(f"ratio reference / chunked time: fwd = {fwd:.2f}, fwd+bwd = {bwd:.2f}  (>1 means chunked is faster)")


if __name__ == "__main__":
    main()
