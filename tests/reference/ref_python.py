"""Where the reference Python lives: Python 3.11 with torch 2.13.0 (CPU) and transformers 5.23.0, which
runs the HF side of the parity fixtures, `check_export.py` and the *_vs_torch benchmarks.

`$CASCADE_REF_PYTHON` when set (a path, or a command name looked up on PATH), else `.venv-ref/bin/python`
at the repository root, which `scripts/setup_reference.sh` creates. Standard library only: the benchmarks
and the tests import this from the project's own Python.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV_VAR = "CASCADE_REF_PYTHON"
ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / ".venv-ref" / "bin" / "python"
HOW_TO_GET_IT = f"run scripts/setup_reference.sh (makes .venv-ref) or set {ENV_VAR}"


def ref_python() -> Path | None:
    """The reference interpreter, or None when it does not exist. Not resolved: a venv's python is a link."""
    value = os.environ.get(ENV_VAR, "")
    if value and os.sep not in value:
        found = shutil.which(value)
        return Path(found) if found else None
    path = Path(value).absolute() if value else DEFAULT
    return path if path.is_file() and os.access(path, os.X_OK) else None


def require_ref_python() -> Path:
    """`ref_python()`, or SystemExit with one line saying how to get it."""
    path = ref_python()
    if path is None:
        where = os.environ.get(ENV_VAR) or DEFAULT
        raise SystemExit(f"error: no reference Python at {where}; {HOW_TO_GET_IT}")
    return path
