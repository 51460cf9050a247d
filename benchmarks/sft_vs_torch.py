"""SFT train-step throughput: cascade_jax's jitted step vs transformers (torch CPU) on the same packed batches.

For each recipe (the bundled `tiny` one and a `small` one of ~20M parameters built from it by overrides),
draws real packed batches from the SFT pipeline, times our full train step (forward, backward, clipping,
AdamW, MoE bias update) and the torch reference's (same config, AdamW, masked NLL) on the same batches,
alternating the two, and prints non-padding tokens/s for both, ratio last. Compilation is excluded.

    .venv/bin/python benchmarks/sft_vs_torch.py [--recipes tiny small] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cascade_jax.data import SFTData  # noqa: E402
from cascade_jax.train.config import load_sft_config  # noqa: E402
from cascade_jax.train.optimizer import build_optimizer  # noqa: E402
from cascade_jax.train.setup import build_model  # noqa: E402
from cascade_jax.train.state import init_train_state  # noqa: E402
from cascade_jax.train.step import NextTokenLoss, train_step  # noqa: E402
from tests.reference.ref_python import require_ref_python  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPES = {
    "tiny": [],
    "small": ["model.overrides={hidden_size: 384, layer_pattern: 'MEM*EMEM', num_attention_heads: 6, head_dim: 64, "
              "num_key_value_heads: 2, mamba_num_heads: 12, mamba_head_dim: 64, n_groups: 2, ssm_state_size: 64, "
              "chunk_size: 128, n_routed_experts: 16, num_experts_per_tok: 4, moe_intermediate_size: 256, "
              "moe_shared_expert_intermediate_size: 512, vocab_size: 4096}", "data.max_len=2048", "data.batch_size=2"],
}


def packed_batches(cfg, count):
    iterator = iter(SFTData(cfg.data))
    batches = [next(iterator) for _ in range(count)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def time_ours(cfg, batches, steps):
    model = build_model(cfg, 0)
    tx = build_optimizer(cfg.optimizer, 1000)
    graphdef, state = init_train_state(model, tx, 0)
    settings = dict(loss_fn=NextTokenLoss(cfg.train.loss_chunk_size), bias_update_rate=cfg.moe.bias_update_rate)
    one = lambda i: {k: v[i % len(v)][None] for k, v in batches.items()}  # noqa: E731
    t0 = time.perf_counter()
    state, metrics = train_step(state, one(0), graphdef=graphdef, tx=tx, **settings)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        state, metrics = train_step(state, one(i), graphdef=graphdef, tx=tx, **settings)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return model.config, times, compile_s


def time_torch(config, batch_file, steps):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config.to_hf(), f)
    out = subprocess.run([require_ref_python(), os.path.join(ROOT, "benchmarks", "_torch_sft_step.py"), "--config", f.name,
                          "--batches", batch_file, "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both measurements")
    args = p.parse_args()
    for name in args.recipes:
        cfg = load_sft_config(os.path.join(ROOT, "configs", "sft", "tiny.yaml"), RECIPES[name])
        batches = packed_batches(cfg, args.steps + 2)
        tokens_per_step = int((batches["segment_ids"] > 0).sum() / batches["segment_ids"].shape[0])
        with tempfile.TemporaryDirectory() as tmp:
            batch_file = os.path.join(tmp, "batches.npz")
            np.savez(batch_file, **batches)
            ours, theirs = [], []
            for _ in range(args.rounds):
                config, times, compile_s = time_ours(cfg, batches, args.steps)
                ours += times
                theirs += time_torch(config, batch_file, args.steps)
        rate = lambda times: tokens_per_step / float(np.median(times))  # noqa: E731
        print(f"[{name}] params {config.num_params() / 1e6:.2f}M, batch {batches['tokens'].shape[1:]} "
              f"({tokens_per_step} non-padding tokens/step), compile {compile_s:.1f} s (excluded)")
        print(f"[{name}] cascade_jax {rate(ours):9.0f} tokens/s   (median of {len(ours)} steps)")
        print(f"[{name}] torch       {rate(theirs):9.0f} tokens/s   (median of {len(theirs)} steps)")
        print(f"[{name}] ratio cascade_jax / torch = {rate(ours) / rate(theirs):.2f}")


if __name__ == "__main__":
    main()
