"""transformers NemotronH SFT steps on given packed batches (the reference side of sft_vs_torch.py).

Run with the reference Python (`bash scripts/setup_reference.sh` makes it, $CASCADE_REF_PYTHON overrides it):
    .venv-ref/bin/python benchmarks/_torch_sft_step.py --config cfg.json --batches b.npz --steps 5
Same recipe as ours: masked token-level NLL, global-norm clipping, AdamW; packed documents are passed
as restarting position_ids (HF5 then masks attention block-diagonally; its Mamba layers ignore packing,
which does not change the cost). Prints one JSON line: per-step seconds and losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM

transformers.logging.set_verbosity_error()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batches", required=True, help="npz of [N, B, T] tokens, targets, loss_mask, positions")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    with open(args.config) as f:
        cfg = json.load(f)
    cfg.pop("torch_dtype", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NemotronHForCausalLM(NemotronHConfig(**cfg)).to(torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    data = np.load(args.batches)
    batches = [{k: torch.from_numpy(data[k][i].astype(np.int64)) for k in ("tokens", "targets", "loss_mask", "positions")}
               for i in range(data["tokens"].shape[0])]

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["tokens"], position_ids=batch["positions"], use_cache=False).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1).float()
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step(batches[(args.warmup + i) % len(batches)]))
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(step_s=times, loss=losses, params=sum(p.numel() for p in model.parameters()))))


if __name__ == "__main__":
    main()
