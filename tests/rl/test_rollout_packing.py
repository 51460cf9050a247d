"""Rollouts packed into rows: every response token once, in order, with its sampler log-prob and sequence."""

import numpy as np
import pytest

from cascade_jax.rl.packing import micro_batches, pack_rollouts, per_sequence_mean, per_token


def _rollouts(seed=0, count=7):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 50, rng.integers(1, 9)).tolist() for _ in range(count)]
    responses = [rng.integers(1, 50, rng.integers(1, 7)).tolist() for _ in range(count)]
    logprobs = [(-rng.random(len(r))).tolist() for r in responses]
    return prompts, responses, logprobs


def test_each_sequence_is_a_segment_with_shifted_targets_and_a_response_mask():
    prompts, responses, logprobs = _rollouts()
    rows = pack_rollouts(prompts, responses, logprobs, row_len=20)
    seen = set()
    for j in range(rows["tokens"].shape[0]):
        for segment in range(1, rows["segment_ids"][j].max() + 1):
            where = rows["segment_ids"][j] == segment
            (i,) = set(rows["sequence"][j][where])
            seen.add(i)
            full = prompts[i] + responses[i]
            assert rows["tokens"][j][where].tolist() == full[:-1]
            assert rows["targets"][j][where].tolist() == full[1:]
            mask = rows["loss_mask"][j][where]
            assert mask.tolist() == [0.0] * (len(prompts[i]) - 1) + [1.0] * len(responses[i])
            np.testing.assert_allclose(rows["inf_logp"][j][where][mask > 0], logprobs[i])
    assert seen == set(range(len(prompts)))
    padding = rows["segment_ids"] == 0
    assert (rows["sequence"][padding] == -1).all() and (rows["loss_mask"][padding] == 0).all()


def test_too_long_a_sequence_is_refused_with_its_lengths():
    with pytest.raises(ValueError, match=r"rollout 0: 8 prompt \+ 5 response tokens need 12 positions; rows hold 10"):
        pack_rollouts([[1] * 8], [[2] * 5], [[0.0] * 5], row_len=10)


def test_per_sequence_values_reach_their_tokens_and_means_come_back():
    prompts, responses, logprobs = _rollouts(1)
    rows = pack_rollouts(prompts, responses, logprobs, row_len=16)
    values = np.arange(len(prompts), dtype=np.float32) + 0.5
    spread = per_token(values, rows["sequence"])
    assert (spread[rows["sequence"] == -1] == 0).all()
    means = per_sequence_mean(rows["inf_logp"], rows["sequence"], rows["loss_mask"], len(prompts))
    np.testing.assert_allclose(means, [np.mean(lp) for lp in logprobs], rtol=1e-6)
    np.testing.assert_allclose(per_sequence_mean(spread, rows["sequence"], rows["loss_mask"], len(prompts)), values)


@pytest.mark.parametrize("rows, per_micro, expected", [(1, 4, 1), (5, 4, 2), (9, 4, 4), (8, 2, 4), (17, 2, 16)])
def test_micro_batches_pad_to_a_power_of_two_with_empty_rows(rows, per_micro, expected):
    arrays = {"tokens": np.ones((rows, 6), np.int32), "sequence": np.zeros((rows, 6), np.int32),
              "loss_mask": np.ones((rows, 6), np.float32)}
    out = micro_batches(arrays, per_micro)
    assert out["tokens"].shape == (expected, per_micro, 6)
    flat = {k: v.reshape(-1, 6) for k, v in out.items()}
    assert flat["loss_mask"][rows:].sum() == 0 and (flat["sequence"][rows:] == -1).all()
    assert flat["loss_mask"][:rows].sum() == rows * 6
