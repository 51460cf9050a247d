"""HF transformers NemotronH forward+backward timing (the reference side of train_step_vs_torch.py).

Run with the reference Python (torch + transformers with native NemotronH; `bash scripts/setup_reference.sh`
makes it, $CASCADE_REF_PYTHON overrides it):

    .venv-ref/bin/python benchmarks/_torch_train_step.py --config cfg.json --steps 5

Builds `NemotronHForCausalLM(NemotronHConfig(**config.json))` in fp32 (random init, train mode, HF's default
CPU paths: torch chunked SSD, sdpa attention, default experts implementation), then times steps of
loss = mean cross-entropy(logits, random targets); loss.backward(). Prints one JSON line per timed batch.
With --serve it then keeps reading integers n from stdin and answers each with a JSON line for n more
steps, so a caller can interleave its own measurements with these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM

transformers.logging.set_verbosity_error()   # silence the "falling back to the PyTorch implementation" notes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="HF config.json (or a directory holding one)")
    p.add_argument("--steps", type=int, default=5, help="timed steps in the first batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--serve", action="store_true", help="after the first batch, read step counts from stdin")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("torch_dtype", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NemotronHForCausalLM(NemotronHConfig(**cfg)).to(torch.float32).train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    targets = torch.randint(0, vocab, (args.batch, args.seq_len))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        return loss.item()

    def timed(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        return dict(step_s=times, loss=loss)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    info = dict(params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
                torch=torch.__version__, warmup_s=time.perf_counter() - t0,
                attn_implementation=model.config._attn_implementation,
                experts_implementation=getattr(model.config, "_experts_implementation", None))
    print(json.dumps(dict(info, **timed(args.steps))), flush=True)
    if args.serve:
        for line in sys.stdin:
            if not line.strip():
                break
            print(json.dumps(timed(int(line))), flush=True)


if __name__ == "__main__":
    main()
