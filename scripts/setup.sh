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
# bubblewrap gives cascade_jax.rl.sandbox (RL code rewards) its namespace isolation; optional, non-fatal.
install_bwrap() {
  command -v bwrap >/dev/null && return 0
  command -v apt-get >/dev/null || return 1
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  $sudo apt-get install -y -q bubblewrap >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q bubblewrap >/dev/null 2>&1; }
}
install_bwrap || echo "warning: bubblewrap (bwrap) not installed; the code sandbox will use its weaker rlimits-only fallback" >&2

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "ready: $(.venv/bin/python --version) in .venv"
