#!/usr/bin/env python
"""Check that a directory exported by `python -m tools.convert_hf to-hf` loads in transformers 5.23.0 and
gives the fixture's logits. Run with the Python 3.11 reference environment:

    /work/venvs/ref311/bin/python tests/reference/check_export.py EXPORTED_DIR tests/fixtures/hf/NAME

Checks: `from_pretrained` reports no missing/unexpected keys; every weight equals the fixture model's
bit for bit; float32 logits match `logits.npy` to 1e-4 of the logit scale (the fixture's own fp32-vs-fp64
error is about 1e-6). Every Mamba mixer is patched with `time_step_limit = (0.0, inf)` like the fixtures.
Exit status 0 when all pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import NemotronHForCausalLM

NO_CLAMP = (0.0, float("inf"))


def load(directory: Path) -> NemotronHForCausalLM:
    model, info = NemotronHForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"{directory}: loading problems {problems}")
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = NO_CLAMP
    return model.eval()


def main(exported: Path, fixture: Path) -> int:
    torch.set_num_threads(1)
    model, reference = load(exported), load(fixture)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())[:5]
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    ids = torch.from_numpy(np.load(fixture / "inputs.npy")).long()
    expected = np.load(fixture / "logits.npy")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()
    error = float(np.abs(logits - expected).max() / np.abs(expected).max())
    ok = not differing and error <= 1e-4
    print(f"{exported.name} vs {fixture.name}: {len(ours)} weights, {len(differing)} differ; "
          f"logits max error {error:.2e} of the logit scale -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
