"""benchmarks/gpu/bench.py runs end to end (every section, toy shapes, on CPU) and ends with its table, so a
GPU session spends its minutes measuring rather than debugging the script. The numbers mean nothing here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "gpu" / "bench.py"


def test_smoke_run_checks_every_variant_and_prints_the_table_last(tmp_path):
    rows_path = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--reps", "1", "--json", str(rows_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.rstrip().splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| section |"))
    assert all(line.startswith("|") for line in table[header:]), "the table must be the last thing printed"
    rows = json.loads(rows_path.read_text())
    sections = {r["section"].split()[0] for r in rows}
    assert sections == {"peak", "moe", "mamba", "ssd", "attention", "lm_head+CE", "train", "decode", "plan"}
    checked = [r for r in rows if r["check"].startswith("rel.err")]
    assert len(checked) >= 8 and all("WRONG" not in r["check"] for r in checked)
    assert not [r for r in rows if r["check"].startswith(("FAILED", "skipped"))]
    assert all(r["ratio"] is not None for r in rows if r["section"].startswith(("moe", "attention", "mamba")))


def test_unknown_section_is_one_line():
    done = subprocess.run([sys.executable, str(BENCH), "--only", "moe,warp"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2 and "unknown section(s) ['warp']" in done.stderr


@pytest.mark.parametrize("script", ["run.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / script)], check=True)
