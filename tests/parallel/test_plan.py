"""cascade-plan on the tiny preset: the compiled step's accounting adds up and tracks the mesh."""

import pytest

from cascade_jax.cli.plan import format_report
from cascade_jax.cli.plan_step import plan_train_step


def _plan(**mesh):
    return plan_train_step(preset="tiny", mesh_sizes=mesh, seq_len=128, rows=0, micro_batches=1, remat="full",
                           dtype="float32", dispatch="allgather", loss_chunk=64)


def test_plan_accounts_for_the_whole_step():
    one, eight = _plan(data=8), _plan(fsdp=8)   # data=8 replicates the parameters
    for r in (one, eight):
        assert r["total_bytes"] == r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"] - r["alias_bytes"]
        assert r["argument_bytes"] >= r["param_bytes"] + r["opt_bytes"]
    # Parameters and Adam state split 8 ways (norms and odd-sized vectors stay whole: allow a little slack).
    assert eight["param_bytes"] < one["param_bytes"] / 6
    assert eight["opt_bytes"] < one["opt_bytes"] / 6
    # XLA's FLOPs per token are those of a training step: at least the 6·N_active matmul estimate's order.
    assert 0.3 * one["six_n_active"] < one["flops_per_token"] < 5 * one["six_n_active"]
    assert "fits in 141 GB: yes" in format_report(eight, 141e9, 1.0)


def test_plan_rejects_a_mesh_that_does_not_divide():
    with pytest.raises(ValueError):
        _plan(fsdp=3)
