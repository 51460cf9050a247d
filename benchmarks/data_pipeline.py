"""Packed SFT pipeline throughput at max_len 262,144 vs the bare tokenizer on the same text, same run.

    python benchmarks/data_pipeline.py [--epochs 4] [--max-len 262144] [--workers 0] [--repeats 3]

Two corpora, each measured the same way:
- ``tiny``: the bundled tiny SFT set (short chats, ~120 tokens each: the worst case for per-sample
  Python work), repeated for ``--epochs``;
- ``long``: generated here (not stored) — chats whose thinking trace solves many arithmetic problems
  step by step, ~4K tokens each, closer to real reasoning SFT samples.

Pipeline: JSONL records → parse + validate → chat template → tokenize (chunked, background
thread) → loss mask → first-fit packing into 262,144-token rows → batches of 1 row; its figure
counts real (non-padding) tokens of the rows. Reference: the same tokenizer on the same rendered
conversations (parsed and rendered beforehand, untimed), as one ``encode_batch_fast`` call (Rust
threads on all cores) and as a Python loop of ``encode``. Timings are the best of ``--repeats``
interleaved runs (the machine is shared). Ratios are pipeline / the faster reference; last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from cascade_jax.data import chat_template as ct  # noqa: E402
from cascade_jax.data.config import TINY_DATA, DataConfig, SourceConfig  # noqa: E402
from cascade_jax.data.pipeline import SFTData  # noqa: E402
from cascade_jax.data.records import chat_sample  # noqa: E402
from cascade_jax.data.tasks import arithmetic  # noqa: E402


def write_long_corpus(path: str, n: int, problems: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            tasks = [arithmetic.generate(rng) for _ in range(problems)]
            prompt = "Solve each problem.\n" + "\n".join(f"{i + 1}. {t['prompt']}" for i, t in enumerate(tasks))
            reasoning = "\n\n".join(f"Problem {i + 1}.\n{t['reasoning']}" for i, t in enumerate(tasks))
            answer = "\n".join(f"{i + 1}. {t['response']}" for i, t in enumerate(tasks))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer,
                                              "reasoning_content": reasoning}]}) + "\n")


def measure(path: str, epochs: float, args) -> float:
    cfg = DataConfig(sources=[SourceConfig(paths=[path])], max_len=args.max_len, batch_size=1,
                     num_epochs=epochs, num_packing_bins=args.bins, worker_count=args.workers,
                     drop_remainder=False, shard_index=0, shard_count=1)
    data = SFTData(cfg)
    texts = []  # the exact record sequence the pipeline reads, rendered for the reference (untimed)
    for rec in data.records:
        s = chat_sample(rec["raw"])
        texts.append(ct.render_text(s["messages"], s["tools"]))
    tok = data.tokenizer._tok

    def bare_batch() -> int:
        return sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))

    def bare_loop() -> int:
        return sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)

    def pipeline() -> int:
        n, it = 0, iter(data)
        for batch in it:
            n += int(np.count_nonzero(batch["segment_ids"]))
        it.close()
        return n

    fns = {"batch": bare_batch, "loop": bare_loop, "pipe": pipeline}
    best = {k: (0, float("inf")) for k in fns}
    for _ in range(args.repeats):  # interleaved, best of each
        for k, fn in fns.items():
            t = time.perf_counter()
            n = fn()
            best[k] = (n, min(best[k][1], time.perf_counter() - t))
    (n_b, t_b), (n_l, t_l), (n_p, t_p) = best["batch"], best["loop"], best["pipe"]
    ref = max(n_b / t_b, n_l / t_l)
    print(f"  {len(texts)} samples ({n_b / len(texts):.0f} tokens each on average), {epochs:g} epochs of {path}")
    print(f"  bare tokenizer encode_batch_fast : {n_b / t_b / 1e3:7.0f}K tokens/s ({n_b} tokens, {t_b:.2f}s)")
    print(f"  bare tokenizer encode loop       : {n_l / t_l / 1e3:7.0f}K tokens/s ({n_l} tokens, {t_l:.2f}s)")
    print(f"  packed pipeline                  : {n_p / t_p / 1e3:7.0f}K tokens/s ({n_p} tokens in "
          f"{-(-n_p // args.max_len)}+ rows of {args.max_len}, {t_p:.2f}s)")
    print(f"  ratio pipeline / bare tokenizer  : {n_p / t_p / ref:.2f}")
    return n_p / t_p / ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=4.0, help="passes over the tiny corpus")
    ap.add_argument("--long-samples", type=int, default=600)
    ap.add_argument("--max-len", type=int, default=262144)
    ap.add_argument("--bins", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"max_len {args.max_len}, packing bins {args.bins}, workers {args.workers}, cpus {os.cpu_count()}")
    print("tiny corpus (short chats):")
    r_tiny = measure(os.path.join(TINY_DATA, "sft.jsonl"), args.epochs, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "long.jsonl")
        write_long_corpus(path, args.long_samples)
        print("long corpus (reasoning-length chats):")
        r_long = measure(path, 1.0, args)
    print(f"ratio pipeline / bare tokenizer: tiny {r_tiny:.2f}, long {r_long:.2f}")


if __name__ == "__main__":
    main()
