"""Flash vs XLA attention backend: compiled scratch memory and wall time of forward + backward.

    python benchmarks/attention_flash.py [--length 2048] [--memory-length 16384]

Memory is XLA's own figure (`memory_analysis().temp_size_in_bytes` of the jitted gradient), taken from
compilation alone, so it can be read at lengths too long to run on a CPU. Time is measured at `--length`
with one packed row of 4 documents. The ratio (flash / xla) comes last on each line.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from cascade_jax.ops.attention import attention


def _problem(length, heads=8, kv_heads=2, head_dim=64):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (1, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (1, length, kv_heads, head_dim), jnp.float32)
    segment_ids = (jnp.arange(length)[None] * 4 // length + 1).astype(jnp.int32)
    return q, k, v, segment_ids


def _grad_fn(backend, block):
    def loss(q, k, v, segment_ids):
        return attention(q, k, v, segment_ids, backend=backend, block_size=block).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _scratch_bytes(backend, block, length):
    return _grad_fn(backend, block).lower(*_problem(length)).compile().memory_analysis().temp_size_in_bytes


def _seconds(backend, block, length, repeats=3):
    fn, args = _grad_fn(backend, block), _problem(length)
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--memory-length", type=int, default=16384)
    p.add_argument("--block", type=int, default=512)
    args = p.parse_args()
    xla_mb, flash_mb = (_scratch_bytes(b, args.block, args.memory_length) / 2**20 for b in ("xla", "flash"))
    print(f"scratch memory, T=S={args.memory_length}: xla {xla_mb:.1f} MiB, flash {flash_mb:.1f} MiB, "
          f"ratio {flash_mb / xla_mb:.3f}")
    xla_s, flash_s = (_seconds(b, args.block, args.length) for b in ("xla", "flash"))
    print(f"fwd+bwd time, T=S={args.length}: xla {xla_s * 1e3:.1f} ms, flash {flash_s * 1e3:.1f} ms, "
          f"ratio {flash_s / xla_s:.3f}")


if __name__ == "__main__":
    main()
