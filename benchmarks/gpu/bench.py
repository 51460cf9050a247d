"""One call on one GPU: is each fast path right, and how fast is it next to its XLA version?

Sections (each times its variants after compiling them, checks them against the XLA variant, and
records failures instead of stopping; a section is skipped when too little of --budget-s is left):

  peak       bf16 matmul rate and copy bandwidth measured here (the MFU and GB/s denominators)
  moe        one MoE layer forward+backward (router, sort, expert FFNs, combine) at the nano shape
             (128 experts, top-6, hidden 2688, expert 1856, relu²) and the Qwen3-30B-A3B shape (128,
             top-8, 2048, 768, SwiGLU): grouped matmul tokamax vs XLA's ragged_dot
  mamba      one Mamba-2 layer forward+backward on a packed 32K-token row, SSD xla vs pallas, and the SSD
             scan alone against its memory-bandwidth bound
  attention  one attention layer forward+backward on a packed 32K-token row: xla, flash, tokamax kernels
  loss       lm_head + cross-entropy forward+backward: chunked vs tokamax
  train      the full train step (AdamW) of a reduced-depth nano-width model: auto backends vs XLA
  decode     the sampler's decode step at batch 256 (tokens/s; the XLA path is the only one)
  plan       cascade-plan of the 8-GPU context=8 nano SFT recipe compiled by XLA:GPU (one device's program)

The last thing printed is the table: the check, ms, achieved TFLOP/s or GB/s, MFU against the measured
matmul peak, the XLA variant's ms and, last, the ratio XLA / this (>1: faster than XLA). `--smoke` runs every section at toy
shapes (CPU too; the test suite does, so the script is known to run before a GPU session spends time).

    python benchmarks/gpu/bench.py [--smoke] [--budget-s 480] [--only moe,attention] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from cascade_jax.config import ModelConfig  # noqa: E402

# Compute dtype: bf16, but fp32 for --smoke, since XLA:CPU (jax 0.12.0.1) has been seen returning garbage
# for a bf16 dot fused with a weighted fp32 sum (benchmarks/gpu/NOTES.md).
DTYPE = {"value": jnp.bfloat16}
README_PLAN_GB = 130.6   # README "Parallelism and planning a mesh": the nano SFT recipe, XLA:CPU estimate


@dataclasses.dataclass
class Row:
    section: str
    variant: str
    ms: float | None = None
    rate: str = ""              # "123 TFLOP/s" or "2.1 TB/s"
    mfu: float | None = None
    xla_ms: float | None = None
    check: str = ""             # max relative error against the XLA variant, or what failed

    @property
    def ratio(self) -> float | None:
        return None if self.ms is None or self.xla_ms is None else self.xla_ms / self.ms


class Bench:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.deadline = time.monotonic() + args.budget_s
        self.peak_flops = self.bandwidth = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.section:10s} {row.variant:28s} {_ms(row.ms):>10s} {row.rate:>14s} "
              f"{_pct(row.mfu):>6s} {row.check}", flush=True)
        return row

    def rate(self, flops=None, bytes_=None, seconds=None):
        if seconds is None:
            return "", None
        if flops is not None:
            mfu = flops / seconds / self.peak_flops if self.peak_flops else None
            return f"{flops / seconds / 1e12:.1f} TFLOP/s", mfu
        return f"{bytes_ / seconds / 1e9:.0f} GB/s", None


# ------------------------------------------------------------------------------------------- helpers
def _ms(x):
    return "-" if x is None else f"{x:.3f}"


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def timed(fn, *args, reps: int) -> tuple[float, object]:
    """(median seconds of `reps` calls after one untimed call, the untimed call's output); compile excluded."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def max_rel_error(got, want) -> float:
    """max |got − want| / max |want| over every leaf (fp32)."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        worst = max(worst, float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return worst


def variants(bench: Bench, section: str, build, names, flops=None, bytes_=None, tolerance=2e-2, reference=None):
    """Compile and time `build(name)` for each name; the first (or `reference`) is the XLA variant."""
    reference = reference or names[0]
    results = {}
    for name in names:
        if bench.left() < 20:
            bench.add(Row(section, name, check="skipped: out of time"))
            continue
        try:
            fn, args = build(name)
            seconds, out = timed(jax.jit(fn), *args, reps=bench.args.reps)
            results[name] = (seconds, out)
        except Exception as error:   # a kernel that does not lower here must not end the run
            bench.add(Row(section, name, check=f"FAILED {type(error).__name__}: {_first_line(error)}"))
            if bench.args.verbose:
                traceback.print_exc()
    base = results.get(reference)
    for name, (seconds, out) in results.items():
        rate, mfu = bench.rate(flops, bytes_, seconds)
        check = ""
        if base is not None and name != reference:
            err = max_rel_error(out, base[1])
            check = f"rel.err {err:.1e}" + ("" if err <= tolerance else f" > {tolerance:.0e} WRONG")
        bench.add(Row(section, name, seconds * 1e3, rate, mfu, None if base is None else base[0] * 1e3, check))
    return results


def _first_line(error) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "")[:160]


def packed_segments(length: int, docs: tuple[int, ...]) -> jax.Array:
    """One row of documents with the given lengths (in order), the rest padding (segment 0)."""
    ids = np.zeros(length, np.int32)
    start = 0
    for i, n in enumerate(docs, start=1):
        ids[start:start + n] = i
        start += n
    return jnp.asarray(ids)[None]


def causal_pairs(docs) -> int:
    return sum(n * (n + 1) // 2 for n in docs)


# ------------------------------------------------------------------------------------------- sections
def section_peak(bench: Bench):
    n = 1024 if bench.args.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    seconds, _ = timed(jax.jit(lambda x, y: x @ y), a, b, reps=bench.args.reps * 2)
    bench.peak_flops = 2 * n ** 3 / seconds
    bench.add(Row("peak", f"bf16 matmul {n}³", seconds * 1e3, f"{bench.peak_flops / 1e12:.1f} TFLOP/s", 1.0))
    count = (1 << 20) if bench.args.smoke else (1 << 30)
    x = jnp.ones((count,), jnp.float32)
    seconds, _ = timed(jax.jit(lambda v: v * 2.0), x, reps=bench.args.reps * 2)
    bench.bandwidth = 2 * 4 * count / seconds
    bench.add(Row("peak", f"copy·2 fp32 {4 * count / 1e9:.1f} GB", seconds * 1e3, f"{bench.bandwidth / 1e9:.0f} GB/s"))


def _moe_layer(tokens, hidden, inter, experts, top_k, gated, backend):
    from cascade_jax.model.moe import relu_squared
    from cascade_jax.ops.grouped_matmul import grouped_matmul
    from cascade_jax.ops.permute import sort_rows, unsort_rows

    def layer(x, router, up, down):
        scores = jax.nn.sigmoid(jnp.dot(x, router, preferred_element_type=jnp.float32))
        weights, indices = jax.lax.top_k(scores, top_k)
        flat = indices.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=experts)
        rows = sort_rows(x, order, top_k)
        h = grouped_matmul(rows, up, sizes, backend)
        h = jax.nn.silu(h[:, :inter]) * h[:, inter:] if gated else relu_squared(h)
        out = unsort_rows(grouped_matmul(h, down, sizes, backend), order)
        out = out.reshape(tokens, top_k, hidden).astype(jnp.float32) * weights[..., None]
        return out.sum(1).astype(x.dtype)

    def loss(x, router, up, down, probe):
        return jnp.sum(layer(x, router, up, down).astype(jnp.float32) * probe)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    ks = jax.random.split(jax.random.key(0), 5)
    bf16 = DTYPE["value"]
    args = (jax.random.normal(ks[0], (tokens, hidden), bf16),
            (jax.random.normal(ks[1], (hidden, experts)) * hidden ** -0.5).astype(bf16),
            (jax.random.normal(ks[2], (experts, hidden, inter * (2 if gated else 1))) * hidden ** -0.5).astype(bf16),
            (jax.random.normal(ks[3], (experts, inter, hidden)) * inter ** -0.5).astype(bf16),
            jax.random.normal(ks[4], (tokens, hidden), jnp.float32))
    return grad, args


def section_moe(bench: Bench):
    tokens = 256 if bench.args.smoke else bench.args.moe_tokens
    shapes = {"nano": (2688, 1856, 128, 6, False), "qwen3-30b-a3b": (2048, 768, 128, 8, True)}
    if bench.args.smoke:
        shapes = {"nano": (64, 32, 8, 2, False), "qwen3-30b-a3b": (64, 16, 8, 2, True)}
    for label, (hidden, inter, experts, top_k, gated) in shapes.items():
        matmuls = hidden * inter * (3 if gated else 2)
        flops = 3 * (2 * tokens * top_k * matmuls + 2 * tokens * hidden * experts)
        variants(bench, f"moe {label}", lambda b: _moe_layer(tokens, hidden, inter, experts, top_k, gated, b),
                 ["ragged_dot", "tokamax"], flops=flops)
    print(f"  (moe: {tokens} tokens on this GPU, routed experts only (nano's shared expert is a dense MLP beside "
          f"them); anchors per GPU at the Qwen3 shape on 8×H100: Megatron+DeepEP 12.41 ms, Marin JAX 13.1 ms)")


def _nano_width(smoke: bool, **changes) -> ModelConfig:
    if smoke:
        from cascade_jax.config import _TINY
        return ModelConfig(**_TINY).replace(**changes)
    return ModelConfig().replace(**changes)


def _layer_loss(mixer_cls, config, length, docs, **mixer_kw):
    from flax import nnx

    mixer = mixer_cls(config, rngs=nnx.Rngs(0), dtype=DTYPE["value"], param_dtype=jnp.float32, **mixer_kw)
    graphdef, params = nnx.split(mixer)
    segments = packed_segments(length, docs)
    u = jax.random.normal(jax.random.key(1), (1, length, config.hidden_size), DTYPE["value"])

    def loss(params, u):
        out = nnx.merge(graphdef, params)(u, segments)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32)))

    return jax.value_and_grad(loss, argnums=(0, 1)), (params, u)


def _docs(length: int) -> tuple[int, ...]:
    """A packed row: documents of 1/2, 1/4, 1/8 of the row and two of 1/16 (so boundaries fall mid-chunk
    where the row allows), then what is left of the row as padding."""
    return tuple(n - 3 for n in (length // 2, length // 4, length // 8, length // 16, length // 16))


def section_mamba(bench: Bench):
    from cascade_jax.model.mamba2 import Mamba2Mixer

    length = 512 if bench.args.smoke else bench.args.seq_len
    config = _nano_width(bench.args.smoke)
    docs = _docs(length)
    heads, p, n = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
    proj = 2 * length * config.hidden_size * (config.mamba_in_proj_dim + config.mamba_d_inner)
    flops = 3 * proj   # the projections; the scan is counted by bytes below
    names = ["xla", "pallas"]
    variants(bench, "mamba layer", lambda b: _layer_loss(Mamba2Mixer, config, length, docs, ssd_backend=b),
             names, flops=flops)

    from cascade_jax.ops.ssd import ssd_chunked
    ks = jax.random.split(jax.random.key(2), 4)
    g = config.n_groups
    x = jax.random.normal(ks[0], (1, length, heads, p), DTYPE["value"])
    dt = jax.nn.softplus(jax.random.normal(ks[1], (1, length, heads)) - 4.0)
    A = -jnp.arange(1, heads + 1, dtype=jnp.float32) / heads
    B = (jax.random.normal(ks[2], (1, length, g, n)) * n ** -0.5).astype(DTYPE["value"])
    C = (jax.random.normal(ks[3], (1, length, g, n)) * n ** -0.5).astype(DTYPE["value"])
    segments = packed_segments(length, docs)
    # The least any SSD must move: read x, Δ, B, C (as given), write y in fp32.
    min_bytes = x.nbytes + dt.nbytes + B.nbytes + C.nbytes + x.size * 4

    def scan(name):
        if name == "xla":
            return ssd_chunked
        from cascade_jax.ops.ssd_pallas import ssd_pallas
        return functools.partial(ssd_pallas, **SSD_KERNEL_OPTIONS[name])

    def forward(name):
        fn = scan(name)
        return (lambda *a: fn(*a, config.chunk_size, segments)[0]), (x, dt, A, B, C)

    def forward_backward(name):
        fn = scan(name)
        probe = jnp.cos(jnp.arange(p, dtype=jnp.float32))
        loss = lambda *a: jnp.sum(fn(*a, config.chunk_size, segments)[0] * probe)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), (x, dt, A, B, C)

    kernels = ["xla", *SSD_KERNEL_OPTIONS]
    results = variants(bench, "ssd scan fwd", forward, kernels, bytes_=min_bytes)
    if "xla" in results and bench.bandwidth:
        bound = min_bytes / bench.bandwidth
        print(f"  (ssd scan fwd, xla: {results['xla'][0] / bound:.2f}× its memory-bandwidth bound of "
              f"{bound * 1e3:.3f} ms; the issue's bar is 1.5×)")
    variants(bench, "ssd scan fwd+bwd", forward_backward, ["xla", "pallas", "pallas tf32x3 8 warps"],
             bytes_=3 * min_bytes)


# ssd_pallas's GPU tuning (same math; interpret mode ignores them): HIGHEST is IEEE fp32 without tensor cores.
SSD_KERNEL_OPTIONS = {"pallas": {}, "pallas 8 warps": {"num_warps": 8},
                      "pallas tf32x3": {"dot_precision": "tf32x3"},
                      "pallas tf32x3 8 warps": {"dot_precision": "tf32x3", "num_warps": 8}}


def section_attention(bench: Bench):
    from cascade_jax.model.attention import AttentionMixer

    length = 512 if bench.args.smoke else bench.args.seq_len
    config = _nano_width(bench.args.smoke)
    docs = _docs(length)
    h, kv, p = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    proj = 2 * length * config.hidden_size * (2 * h * p + 2 * kv * p)
    core = 4 * causal_pairs(docs) * h * p
    flops = 3 * proj + 3.5 * core   # backward of the core: ~2.5× its forward (scores recomputed)
    variants(bench, "attention layer", lambda b: _layer_loss(AttentionMixer, config, length, docs, backend=b),
             ["xla", "flash", "tokamax", "tokamax_mosaic", "tokamax_triton"], flops=flops)


def section_loss(bench: Bench):
    from cascade_jax.ops.cross_entropy import cross_entropy_sum

    tokens, hidden, vocab = (256, 64, 4096) if bench.args.smoke else (bench.args.moe_tokens, 2688, 131072)
    ks = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(ks[0], (tokens, hidden), DTYPE["value"])
    w = (jax.random.normal(ks[1], (hidden, vocab)) * hidden ** -0.5).astype(jnp.float32)
    targets = jax.random.randint(ks[2], (tokens,), 0, vocab)
    mask = jnp.ones((tokens,), jnp.int32)

    def build(name):
        loss = lambda h, w: cross_entropy_sum(h, w, targets, mask, 1024, backend=name)[0]  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1)), (h, w)

    variants(bench, "lm_head+CE", build, ["chunked", "tokamax"], flops=3 * 2 * tokens * hidden * vocab)


def _reduced_model(smoke, backends):
    from flax import nnx

    from cascade_jax.model.nemotron_h import NemotronH
    config = _nano_width(smoke, layer_pattern="MEM*E")
    return config, NemotronH(config, rngs=nnx.Rngs(0), dtype=DTYPE["value"], param_dtype=jnp.float32, backends=backends,
                             remat="full")


def section_train(bench: Bench):
    import optax

    from cascade_jax.model.nemotron_h import Backends
    from cascade_jax.train.metrics import train_flops_per_token
    from cascade_jax.train.state import init_train_state
    from cascade_jax.train.step import NextTokenLoss, train_step

    rows, length = (1, 256) if bench.args.smoke else (bench.args.train_rows, bench.args.train_seq)
    choices = {"xla": Backends(attention="xla", grouped_matmul="ragged_dot" if not bench.args.smoke else "xla"),
               "auto": Backends()}
    times = {}
    for name, backends in choices.items():
        if bench.left() < 60:
            bench.add(Row("train step", name, check="skipped: out of time"))
            continue
        try:
            config, model = _reduced_model(bench.args.smoke, backends)
            tx = optax.adamw(1e-5, b1=0.9, b2=0.98, weight_decay=0.1)
            graphdef, state = init_train_state(model, tx, 0)
            del model
            ids = jax.random.randint(jax.random.key(4), (1, rows, length), 0, config.vocab_size)
            segments = jnp.broadcast_to(packed_segments(length, _docs(length)), (1, rows, length))
            batch = {"tokens": ids, "targets": jnp.roll(ids, -1, axis=-1), "loss_mask": (segments > 0).astype(jnp.int32),
                     "segment_ids": segments, "positions": jnp.broadcast_to(jnp.arange(length), (1, rows, length))}
            step = lambda s: train_step(s, batch, graphdef=graphdef, tx=tx, loss_fn=NextTokenLoss(1024))  # noqa: E731
            state, _ = step(state)                                  # compile + allocate
            jax.block_until_ready(state)
            samples = []
            for _ in range(bench.args.reps):
                start = time.perf_counter()
                state, metrics = step(state)
                jax.block_until_ready(metrics["loss"])
                samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            times[name] = seconds
            flops = train_flops_per_token(config, length) * rows * length
            rate, mfu = bench.rate(flops=flops, seconds=seconds)
            check = f"loss {float(metrics['loss']):.4f}, {config.num_params() / 1e9:.2f}B params, {rows}×{length} tokens"
            bench.add(Row("train step", f"{name} ({config.layer_pattern})", seconds * 1e3, rate, mfu,
                          times.get("xla", seconds) * 1e3 if name != "xla" else None, check))
            del state
        except Exception as error:
            bench.add(Row("train step", name, check=f"FAILED {type(error).__name__}: {_first_line(error)}"))
            if bench.args.verbose:
                traceback.print_exc()


def section_decode(bench: Bench):
    from cascade_jax.inference import engine as engine_mod
    from cascade_jax.model.nemotron_h import Backends

    slots, max_len, steps = (8, 64, 4) if bench.args.smoke else (256, 2048, 16)
    config, model = _reduced_model(bench.args.smoke, Backends())
    engine = engine_mod.Engine(model, max_slots=slots, max_len=max_len)
    live = dataclasses.replace(engine.slots, running=jnp.ones((slots,), bool),
                               max_new=jnp.full((slots,), max_len, jnp.int32))

    def run(state, cache, slot_state):
        return engine_mod._decode_chunk(state, cache, slot_state, graphdef=engine.graphdef, steps=steps)

    cache, slot_state = engine.cache, live
    cache, slot_state, _ = run(engine.state, cache, slot_state)       # compile
    jax.block_until_ready(slot_state)
    samples = []
    for _ in range(bench.args.reps):
        start = time.perf_counter()
        cache, slot_state, out = run(engine.state, cache, slot_state)
        jax.block_until_ready(out)
        samples.append(time.perf_counter() - start)
    per_token = statistics.median(samples) / steps
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(engine.state))
    bench.add(Row("decode", f"batch {slots} ({config.layer_pattern})", per_token * 1e3,
                  f"{param_bytes / per_token / 1e9:.0f} GB/s", None, None,
                  f"{slots / per_token:.0f} tokens/s; parameter bytes read per step / time"))


def section_plan(bench: Bench):
    if jax.default_backend() != "gpu" and not bench.args.smoke:
        bench.add(Row("plan", "XLA:GPU", check="skipped: no GPU"))
        return
    target = "gpu" if jax.default_backend() == "gpu" else "cpu"
    command = [sys.executable, "-m", "cascade_jax.cli.plan", "--target", target]
    if bench.args.smoke:
        command += ["--preset", "tiny", "--mesh", "context=2", "--seq-len", "256", "--devices", "2"]
    else:
        command += ["--config", os.path.join(REPO, "configs/sft/nano-30b-a3b.yaml")]
    # This process holds most of the GPU's memory; the plan only compiles, so it allocates lazily.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    # If the recipe's own kernels do not compile for compile-only GPUs, XLA's ragged_dot still gives the plan.
    for extra in ([], ["model.backends.grouped_matmul=ragged_dot"]):
        if bench.left() < 30:
            bench.add(Row("plan", " ".join(extra) or "recipe", check="skipped: out of time"))
            return
        timeout = max(10, int(bench.left()) - 5)
        start = time.perf_counter()
        try:
            done = subprocess.run(command + extra, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        except subprocess.TimeoutExpired:
            bench.add(Row("plan", f"XLA:{target.upper()}", check=f"timed out after {timeout} s"))
            return
        print(done.stdout + done.stderr[-2000:])
        total = next((line.split()[-2:] for line in done.stdout.splitlines() if line.strip().startswith("total")), None)
        status = "ok" if done.returncode == 0 else f"FAILED rc={done.returncode}"
        label = f"nano SFT context=8, XLA:{target.upper()}" + (f" ({' '.join(extra)})" if extra else "")
        bench.add(Row("plan", label, (time.perf_counter() - start) * 1e3, "", None, None,
                      f"{status}; total per device {' '.join(total) if total else '?'} "
                      f"(README, XLA:CPU: {README_PLAN_GB} GB); ms = compile time"))
        if done.returncode == 0:
            return


SECTIONS = {"peak": section_peak, "moe": section_moe, "mamba": section_mamba, "attention": section_attention,
            "loss": section_loss, "train": section_train, "decode": section_decode, "plan": section_plan}


def print_table(rows: list[Row]):
    print("\n| section | variant | check | ms | achieved | MFU | XLA ms | XLA / this |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        print(f"| {r.section} | {r.variant} | {r.check} | {_ms(r.ms)} | {r.rate} | {_pct(r.mfu)} | "
              f"{'' if r.xla_ms is None else _ms(r.xla_ms)} | {ratio} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy shapes, every section (runs on CPU)")
    p.add_argument("--budget-s", type=float, default=480, help="stop starting sections after this many seconds")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections of {list(SECTIONS)} (peak always runs first)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=32768, help="tokens of the packed row (mamba, attention)")
    p.add_argument("--moe-tokens", type=int, default=16384, help="tokens through the MoE layer and the loss")
    p.add_argument("--train-rows", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=8192)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed variants")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    chosen = ["peak"] + [s for s in chosen if s != "peak"]   # the MFU and GB/s denominators, always first
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {jax.device_count()} × {device.device_kind} ({device.platform}); "
          f"budget {args.budget_s:.0f} s{'; smoke shapes' if args.smoke else ''}", flush=True)
    DTYPE["value"] = jnp.float32 if args.smoke else jnp.bfloat16
    bench = Bench(args)
    for name in chosen:
        if bench.left() < 15:
            bench.add(Row(name, "", check="skipped: out of time"))
            continue
        print(f"[{name}] {bench.left():.0f} s left", flush=True)
        try:
            SECTIONS[name](bench)
        except Exception as error:
            bench.add(Row(name, "", check=f"FAILED {type(error).__name__}: {_first_line(error)}"))
            if args.verbose:
                traceback.print_exc()
        jax.clear_caches()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ratio": r.ratio} for r in bench.rows], f, indent=1)
    print_table(bench.rows)
    return 1 if any(r.check.startswith("FAILED") or "WRONG" in r.check for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
