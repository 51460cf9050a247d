"""Rollouts into training rows: prompt + response sequences packed into fixed-width [R, T] rows.

A sequence (prompt p, response r) occupies len(p) + len(r) − 1 positions of a row: inputs (p + r)[:-1],
targets (p + r)[1:], and a loss mask on the positions whose target is a response token. Sequences are
placed first-fit in arrival order, each its own segment (1, 2, … within its row; 0 is padding), so the
model's segment-aware attention and Mamba resets keep them apart. Per-token arrays carry what the loss
needs: the sampler's log-probs and the sequence index (−1 on padding), through which per-sequence values
(advantages, sample masks) reach their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FIELDS = ("tokens", "targets", "segment_ids", "loss_mask", "inf_logp", "sequence")


def packed_length(prompt_len: int, response_len: int) -> int:
    return prompt_len + response_len - 1


def pack_rollouts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  response_logprobs: Sequence[Sequence[float]], row_len: int) -> dict[str, np.ndarray]:
    """[R, row_len] arrays (FIELDS) holding every sequence; raises ValueError if one does not fit a row."""
    rows: list[list[int]] = []        # sequence indices per row
    free: list[int] = []              # positions left per row
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        need = packed_length(len(p), len(r))
        if not r or need > row_len:
            raise ValueError(f"rollout {i}: {len(p)} prompt + {len(r)} response tokens need {need} positions; "
                             f"rows hold {row_len} (raise train.row_len)" if r else f"rollout {i}: empty response")
        row = next((j for j, left in enumerate(free) if left >= need), None)
        if row is None:
            rows.append([]), free.append(row_len)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= need
    out = {k: np.zeros((len(rows), row_len), np.float32 if k in ("loss_mask", "inf_logp") else np.int32)
           for k in FIELDS}
    out["sequence"][:] = -1
    for j, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, 1):
            full = np.asarray(list(prompts[i]) + list(responses[i]), np.int32)
            n, first = len(full) - 1, len(prompts[i]) - 1   # first: the position predicting response token 0
            span = slice(start, start + n)
            out["tokens"][j, span], out["targets"][j, span] = full[:-1], full[1:]
            out["segment_ids"][j, span], out["sequence"][j, span] = segment, i
            out["loss_mask"][j, start + first:start + n] = 1.0
            out["inf_logp"][j, start + first:start + n] = response_logprobs[i]
            start += n
    return out


def per_token(values: np.ndarray, sequence: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """A per-sequence value [S] spread over the tokens of each sequence ([R, T]; `fill` on padding)."""
    values = np.asarray(values, np.float32)
    return np.where(sequence >= 0, values[np.maximum(sequence, 0)], np.float32(fill)).astype(np.float32)


def per_sequence_mean(token_values: np.ndarray, sequence: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Mean over each sequence's masked tokens ([S]; 0 for a sequence without any)."""
    weights = (mask > 0) & (sequence >= 0)
    index = sequence[weights]
    sums = np.bincount(index, weights=token_values[weights], minlength=count)
    counts = np.bincount(index, minlength=count)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def micro_batches(arrays: dict[str, np.ndarray], rows_per_micro_batch: int) -> dict[str, np.ndarray]:
    """[R, T] → [A, B, T] with B = rows_per_micro_batch and A the next power of two ≥ R / B, padding with
    empty rows (mask 0, sequence −1): few distinct shapes, so the step compiles a handful of times at most."""
    rows = next(iter(arrays.values())).shape[0]
    needed = -(-rows // rows_per_micro_batch)
    count = 1 << (needed - 1).bit_length()
    pad = count * rows_per_micro_batch - rows
    out = {}
    for k, v in arrays.items():
        padded = np.pad(v, ((0, pad), (0, 0)), constant_values=-1 if k == "sequence" else 0)
        out[k] = padded.reshape(count, rows_per_micro_batch, *v.shape[1:])
    return out
