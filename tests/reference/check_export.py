#!/usr/bin/env python
"""Check that a directory exported by `python -m tools.convert_hf to-hf` loads in transformers 5.23.0 (native
NemotronH, no remote code) and computes what cascade_jax computes. Run with the reference Python
(`bash scripts/setup_reference.sh` makes .venv-ref):

    .venv-ref/bin/python tests/reference/check_export.py EXPORTED_DIR tests/fixtures/hf/NAME
    .venv-ref/bin/python tests/reference/check_export.py EXPORTED_DIR [REFERENCE_DIR] --expect-logits FILE.npz

Both modes: `AutoModelForCausalLM.from_pretrained(EXPORTED_DIR)` must build transformers' own
NemotronHForCausalLM and report no missing, unexpected or mismatched keys; the model runs in float32.

Fixture mode (an export of a converted fixture): every weight equals REFERENCE_DIR's bit for bit, and the
logits of its `inputs.npy` match `logits.npy` to 1e-4 of the logit scale (the fixture's own fp32-vs-fp64
error is about 1e-6). Every Mamba mixer is patched with `time_step_limit = (0.0, inf)` like the fixtures.

Logits mode (any export, e.g. of a trained checkpoint, whose weights differ from every fixture): FILE.npz
holds `input_ids` (int, [B, T]) and `logits` (float32, [B, T, V]) computed by cascade_jax from the same
directory (`cascade_jax.load_pretrained(EXPORTED_DIR)`). transformers' float32 logits for those ids must
match: max |Δlogit| <= 1e-4 * max(1, max |logit|) (`--tolerance`; float32 on both sides, where summation
order alone gives about 1e-6 of the logit scale on the fixtures). Mamba mixers use the config's `time_step_limit` (transformers
5.23.0 ignores it and clamps Δ at time_step_min; cascade_jax applies the config's). With REFERENCE_DIR, the
export must also have its parameter names, shapes and dtypes (values are not compared).

Prints one line, `ok: ...` (exit 0) or `FAIL: ...` (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHForCausalLM

NO_CLAMP = (0.0, float("inf"))
FIXTURE_TOLERANCE = 1e-4   # of the logit scale
LOGITS_TOLERANCE = 1e-4    # of max(1, logit scale)


class CheckFailed(Exception):
    pass


def load(directory: Path, time_step_limit=None) -> NemotronHForCausalLM:
    """float32 model from an HF directory; Mamba mixers clamp Δ to `time_step_limit` (default: the config's)."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True,
                                                       trust_remote_code=False)
    if type(model) is not NemotronHForCausalLM:
        raise CheckFailed(f"{directory}: loads as {type(model).__name__}, not transformers' NemotronHForCausalLM")
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise CheckFailed(f"{directory}: loading problems {problems}")
    limit = tuple(float(v) for v in (time_step_limit or model.config.time_step_limit))
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = limit
    return model.eval()


def logits_of(model: NemotronHForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


def check_fixture(exported: Path, fixture: Path) -> str:
    model, reference = load(exported, NO_CLAMP), load(fixture, NO_CLAMP)
    ours, theirs = model.state_dict(), reference.state_dict()
    if ours.keys() != theirs.keys():
        raise CheckFailed(f"parameter names differ from {fixture}: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    expected = np.load(fixture / "logits.npy")
    logits = logits_of(model, np.load(fixture / "inputs.npy"))
    error = float(np.abs(logits - expected).max() / np.abs(expected).max())
    line = (f"{exported.name} vs {fixture.name}: {len(ours)} weights, {len(differing)} differ; "
            f"logits max error {error:.2e} of the logit scale (tolerance {FIXTURE_TOLERANCE:.0e})")
    if differing or not error <= FIXTURE_TOLERANCE:
        raise CheckFailed(line)
    return line


def check_logits(exported: Path, expect: Path, reference: Path | None, relative: float = LOGITS_TOLERANCE) -> str:
    with np.load(expect) as saved:
        missing = {"input_ids", "logits"} - set(saved.files)
        if missing:
            raise CheckFailed(f"{expect}: no {sorted(missing)} array (expected input_ids and logits)")
        ids, expected = saved["input_ids"], saved["logits"].astype(np.float32)
    model = load(exported)
    if reference is not None:
        ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        theirs = {k: (tuple(v.shape), v.dtype) for k, v in load(reference).state_dict().items()}
        if ours != theirs:
            names = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
            raise CheckFailed(f"parameters differ from {reference} in names, shapes or dtypes: {names[:5]}")
    logits = logits_of(model, ids)
    if logits.shape != expected.shape:
        raise CheckFailed(f"logits shape {logits.shape} from transformers, {expected.shape} in {expect}")
    delta = float(np.abs(logits - expected).max())
    scale = float(np.abs(expected).max())
    tolerance = relative * max(1.0, scale)
    line = (f"{exported} loads in transformers {transformers.__version__} as NemotronHForCausalLM; "
            f"{ids.size} tokens, max |Δlogit| = {delta:.3e} (max |logit| {scale:.3g}, tolerance {tolerance:.1e})")
    if not delta <= tolerance:
        raise CheckFailed(line)
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exported", type=Path, help="directory written by tools.convert_hf to-hf")
    parser.add_argument("reference", type=Path, nargs="?", help="fixture directory (tests/fixtures/hf/NAME)")
    parser.add_argument("--expect-logits", type=Path, metavar="FILE.npz",
                        help="input_ids and logits computed by cascade_jax from EXPORTED_DIR")
    parser.add_argument("--tolerance", type=float, default=LOGITS_TOLERANCE,
                        help=f"logits mode: max |Δlogit| allowed, times max(1, max |logit|) (default {LOGITS_TOLERANCE:g})")
    args = parser.parse_args(argv)
    if args.reference is None and args.expect_logits is None:
        parser.error("give REFERENCE_DIR, --expect-logits FILE.npz, or both")
    torch.set_num_threads(1)
    try:
        if args.expect_logits is not None:
            line = check_logits(args.exported, args.expect_logits, args.reference, args.tolerance)
        else:
            line = check_fixture(args.exported, args.reference)
    except (CheckFailed, OSError, ValueError) as e:
        print(f"FAIL: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    print(f"ok: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
