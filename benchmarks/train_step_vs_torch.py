"""Training-step throughput: cascade_jax vs HF transformers (torch) NemotronH on CPU, fp32.

Measures tokens/s of one forward+backward pass (loss = mean token cross-entropy on random targets, gradients
for every parameter) for the same small NemotronH config (M, E and * blocks) in both frameworks:

* cascade_jax: `jax.jit(jax.value_and_grad(loss))` over the nnx.split parameters; data pre-generated,
  compile time reported separately and excluded, every step ends in block_until_ready.
* torch: `benchmarks/_torch_train_step.py` in the reference Python (.venv-ref, see
  tests/reference/ref_python.py) builds
  `NemotronHForCausalLM(NemotronHConfig(**config.to_hf()))` and times `loss.backward()` steps
  (torch.set_num_threads = number of cores).

The two are timed in alternating rounds (the machine is shared) and the median step time is reported.

    .venv/bin/python benchmarks/train_step_vs_torch.py [--pattern MEM*EMEM --hidden 512 --seq-len 2048 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the repo's cascade_jax, whatever the venv's editable install says
import cascade_jax  # noqa: E402
from tests.reference.ref_python import require_ref_python  # noqa: E402


def make_config(args) -> cascade_jax.ModelConfig:
    return cascade_jax.ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, layer_pattern=args.pattern,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=2 * args.hidden // 64, mamba_head_dim=64, n_groups=1, ssm_state_size=128,
        chunk_size=args.chunk, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, moe_shared_expert_intermediate_size=4 * args.moe_intermediate,
        intermediate_size=4 * args.hidden, max_position_embeddings=max(4096, args.seq_len),
    )


def build_jax_step(config, batch, seq_len):
    model = cascade_jax.NemotronH(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, ids, targets):
        logits = nnx.merge(graphdef, params, rest)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    k1, k2 = jax.random.split(jax.random.key(1))
    ids = jax.random.randint(k1, (batch, seq_len), 0, config.vocab_size, jnp.int32)
    targets = jax.random.randint(k2, (batch, seq_len), 0, config.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(params, rest, ids, targets).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, rest, ids, targets))      # first run (allocation), untimed

    def run(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, rest, ids, targets))
            times.append(time.perf_counter() - t0)
        return times

    return run, compile_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="MEM*EMEM")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=64)
    p.add_argument("--chunk", type=int, default=128)
    args = p.parse_args()

    config = make_config(args)
    tokens = args.batch * args.seq_len
    print(f"config: pattern={config.layer_pattern} hidden={config.hidden_size} vocab={config.vocab_size} "
          f"mamba {config.mamba_num_heads}x{config.mamba_head_dim} state={config.ssm_state_size} "
          f"groups={config.n_groups} chunk={config.chunk_size} | attn {config.num_attention_heads}q/"
          f"{config.num_key_value_heads}kv x{config.head_dim} | moe {config.n_routed_experts} experts "
          f"top-{config.num_experts_per_tok} inter={config.moe_intermediate_size} "
          f"shared={config.moe_shared_expert_intermediate_size}")
    print(f"params: {config.num_params() / 1e6:.2f}M (config.num_params()); batch={args.batch} T={args.seq_len} "
          f"fp32; cores={os.cpu_count()}; jax {jax.__version__} on {jax.devices()[0].platform}")

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f)
        torch_proc = subprocess.Popen(
            [require_ref_python(), os.path.join(HERE, "_torch_train_step.py"), "--config", tmp, "--steps", str(args.steps),
             "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        torch_first = json.loads(torch_proc.stdout.readline())   # torch builds + warms up + round 0 alone
        run_jax, compile_s = build_jax_step(config, args.batch, args.seq_len)
        jax_times, torch_times = run_jax(args.steps), list(torch_first["step_s"])
        for _ in range(args.rounds - 1):
            torch_proc.stdin.write(f"{args.steps}\n")
            torch_proc.stdin.flush()
            torch_times += json.loads(torch_proc.stdout.readline())["step_s"]
            jax_times += run_jax(args.steps)
        torch_proc.stdin.close()
        torch_proc.wait()

    print(f"torch: {torch_first['torch']}, {torch_first['threads']} threads, params {torch_first['params'] / 1e6:.2f}M, "
          f"attn={torch_first['attn_implementation']} experts={torch_first['experts_implementation']}")
    print(f"cascade_jax compile: {compile_s:.1f} s (excluded)")
    for name, times in (("cascade_jax", jax_times), ("torch", torch_times)):
        med = statistics.median(times)
        print(f"{name:12s} step median {med * 1e3:8.1f} ms  best {min(times) * 1e3:8.1f} ms  "
              f"({len(times)} steps)  -> {tokens / med:9.0f} tokens/s")
    ratio = statistics.median(torch_times) / statistics.median(jax_times)
    best = min(torch_times) / min(jax_times)
    print(f"ratio cascade_jax / torch = {ratio:.2f}  (tokens/s from median steps; best-of-{len(jax_times)}: "
          f"{best:.2f}; >1 means cascade_jax is faster)")


if __name__ == "__main__":
    main()
