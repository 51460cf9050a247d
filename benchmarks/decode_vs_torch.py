"""Decode throughput: cascade_jax's slot engine vs transformers `generate` (torch CPU) on the same model and
prompts, and continuous vs static batching on a mix of short and long generations.

    .venv/bin/python benchmarks/decode_vs_torch.py [--prompts 32] [--new 256]

1. The reference side builds a random NemotronH (the `small` config below) with a fixed seed and saves it;
   we load the same weights. Both generate greedily `--new` tokens for every prompt in one batch; our
   time excludes compilation (a first run on the same engine). Prints generated tokens/s, ratio last.
2. 64 requests, a quarter wanting 256 tokens and the rest 16, through 16 slots: continuous batching (a
   finished request's slot is refilled at the next sync) vs static batching (16 at a time, each batch
   waiting for its longest), each timed on its second run (the first compiles the prefill buckets it
   meets). Prints tokens/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cascade_jax as cj  # noqa: E402
from cascade_jax.inference import Engine, SamplingParams, generate  # noqa: E402
from tests.reference.ref_python import require_ref_python  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL = dict(hidden_size=256, hybrid_override_pattern="MEM*EM", num_attention_heads=4, head_dim=64,
             num_key_value_heads=2, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=32,
             chunk_size=64, conv_kernel=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
             moe_shared_expert_intermediate_size=256, vocab_size=4096, intermediate_size=512)


def reference(prompts, new, workdir):
    config = cj.ModelConfig.preset("tiny").to_hf()
    config.update(SMALL)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    out = subprocess.run([require_ref_python(), os.path.join(ROOT, "benchmarks", "_torch_generate.py"), "--config",
                          os.path.join(workdir, "config.json"), "--prompts", os.path.join(workdir, "prompts.json"), "--save",
                          os.path.join(workdir, "model"), "--new", str(new)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(engine, model, prompts, params):
    start = time.perf_counter()
    completions = generate(model, prompts, params, engine=engine)
    return sum(len(c.tokens) for c in completions) / (time.perf_counter() - start)


def continuous_vs_static(model, rng):
    lengths = [256 if i % 4 == 0 else 16 for i in range(64)]
    prompts = [rng.integers(3, 4096, 24).tolist() for _ in lengths]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in lengths]
    engine = Engine(model, max_slots=16, max_len=32 + 256, sync_every=8)

    def static():
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), 16):
            tokens += sum(len(c.tokens) for c in generate(model, prompts[i:i + 16], params[i:i + 16], engine=engine))
        return tokens / (time.perf_counter() - start)

    timed(engine, model, prompts, params), static()   # compile every prefill bucket both modes meet
    return timed(engine, model, prompts, params), static()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 4096, int(n)).tolist() for n in rng.integers(8, 64, args.prompts)]
    with tempfile.TemporaryDirectory() as workdir:
        torch_side = reference(prompts, args.new, workdir)
        model = cj.load_pretrained(os.path.join(workdir, "model"))
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0)
    engine = Engine(model, max_slots=args.prompts, max_len=64 + args.new, sync_every=16)
    generate(model, prompts, params, engine=engine)   # compile
    ours = timed(engine, model, prompts, params)
    theirs = torch_side["tokens"] / torch_side["seconds"]
    print(f"decode, {args.prompts} prompts x {args.new} new tokens, {model.config.num_params() / 1e6:.1f}M params: "
          f"cascade_jax {ours:,.0f} tok/s, transformers {theirs:,.0f} tok/s, ratio {ours / theirs:.2f}")
    continuous, static = continuous_vs_static(model, rng)
    print(f"64 requests (16 x 256 tokens, 48 x 16) through 16 slots: continuous {continuous:,.0f} tok/s, "
          f"static {static:,.0f} tok/s, ratio {continuous / static:.2f}")


if __name__ == "__main__":
    main()
