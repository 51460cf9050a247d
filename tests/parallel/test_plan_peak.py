"""Reading XLA's peak breakdown: top-level entries summed by operation; the CLI prints them."""

import os
import subprocess
import sys

import pytest

from cascade_jax.cli.plan_peak import format_breakdown, peak_breakdown

# The shape of XLA's live-range dump (jax 0.12), trimmed.
DUMP = """HloLiveRange (max 10):
  Live ranges at 7 (peak):
    copy.1: 300 bytes
  Stack trace breakdown for peak usage: 1 500 bytes
    main.1_spmd (100.0%, total: 1 500 bytes, current: 0 bytes, remaining: 1 500 bytes)
      ├── jit(train_step)/while/body/eval_jaxpr/transpose(jvp())/checkpoint/dot_general (40.0%, total: 600 bytes, current: 600 bytes, remaining: 900 bytes)
      ├── state (20.0%, total: 300 bytes, current: 0 bytes, remaining: 900 bytes)
      │   └── params (20.0%, total: 300 bytes, current: 0 bytes, remaining: 900 bytes)
      ├── copy.7 (20.0%, total: 300 bytes, current: 300 bytes, remaining: 300 bytes)
      └── jit(train_step)/while/body/eval_jaxpr/transpose(jvp())/checkpoint/dot_general (20.0%, total: 300 bytes, current: 300 bytes, remaining: 0 bytes)
  Something else:
      ├── not (1.0%, total: 5 bytes, current: 5 bytes, remaining: 0 bytes)
"""


def test_peak_breakdown_sums_top_level_entries_by_operation():
    entries = peak_breakdown(DUMP)
    assert entries == [("transpose(jvp())/checkpoint/dot_general", 900), ("state", 300), ("copy", 300)]
    text = format_breakdown(entries, top=2)
    assert "0.0 MB  60.0%  transpose(jvp())/checkpoint/dot_general" in text and "copy" not in text


def test_no_section_says_so():
    assert peak_breakdown("HloLiveRange (max 1):\n") == []
    assert "no peak breakdown" in format_breakdown([], top=3)


@pytest.mark.slow
def test_cascade_plan_explain_lists_the_peak():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "cascade_jax.cli.plan", "--preset", "tiny", "--devices", "8",
                           "--mesh", "fsdp=8", "--seq-len", "128", "--explain", "3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("largest at the peak (of ")[1].splitlines()
    assert len(lines) == 4 and all("%" in line for line in lines[1:])
