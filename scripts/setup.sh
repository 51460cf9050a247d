#!/usr/bin/env bash
# Create .venv with Python 3.12 and install cascade_jax with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.12 "$(command -v pyenv >/dev/null && PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null)" \
                   "$HOME/.pyenv/versions/3.12.1/bin/python3.12" /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  for dir in "$HOME"/.pyenv/versions/3.1[2-9]*/bin; do
    [ -x "$dir/python3" ] && { echo "$dir/python3"; return 0; }
  done
  return 1
}

PY=$(find_python) || { echo "error: Python >= 3.12 not found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "ready: $(.venv/bin/python --version) in .venv"
