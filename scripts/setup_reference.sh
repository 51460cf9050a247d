#!/usr/bin/env bash
# Create the reference environment .venv-ref at the repository root: Python 3.11 with torch (CPU) and
# transformers with native NemotronH, used by tests/reference/ and the *_vs_torch benchmarks. Idempotent:
# when .venv-ref already has the pinned versions it only says so.
#
#     bash scripts/setup_reference.sh          # then: .venv-ref/bin/python tests/reference/make_fixtures.py
#
# Python 3.11 is looked for in: $PYTHON311, python3.11 on PATH, pyenv's 3.11.x versions,
# ~/.pyenv/versions/3.11*/bin/python3, /usr/local/bin and /usr/bin. Tools that use the environment read
# CASCADE_REF_PYTHON (default .venv-ref/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ref"
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.23.0

die() { echo "error: $*" >&2; exit 1; }

# Succeeds when $1 runs and is CPython 3.11.
is_311() { [[ -n "$1" ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

candidates() {
    command -v python3.11 || true
    if command -v pyenv >/dev/null 2>&1; then
        local version
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.11(\.[0-9]+)?$' | sort -rV); do
            PYENV_VERSION="$version" pyenv which python3.11 2>/dev/null || true
        done
    fi
    local found
    for found in "$HOME"/.pyenv/versions/3.11*/bin/python3 /usr/local/bin/python3.11 /usr/bin/python3.11; do
        [[ -x "$found" ]] && echo "$found"
    done
    return 0
}

find_python311() {
    if [[ -n "${PYTHON311:-}" ]]; then
        is_311 "$PYTHON311" || die "PYTHON311=$PYTHON311 is not a working Python 3.11"
        echo "$PYTHON311"
        return
    fi
    local candidate
    while IFS= read -r candidate; do
        if is_311 "$candidate"; then
            "$candidate" -c 'import sys; print(sys.executable)'   # the interpreter itself, not a pyenv shim
            return
        fi
    done < <(candidates)
    die "no Python 3.11 found (tried \$PYTHON311, python3.11, pyenv 3.11.x, ~/.pyenv/versions/3.11*); install one or set PYTHON311"
}

# Prints the versions line and succeeds when the environment has everything pinned.
installed() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md
import platform
import sys

torch_wanted, transformers_wanted = sys.argv[1:3]
try:
    versions = {name: md.version(name) for name in ("torch", "transformers", "safetensors", "numpy")}
except md.PackageNotFoundError:
    sys.exit(1)
if versions["torch"].split("+")[0] != torch_wanted or versions["transformers"] != transformers_wanted:
    sys.exit(1)
print(f"Python {platform.python_version()}, torch {versions['torch']}, transformers {versions['transformers']}")
EOF
}

if [[ -x "$VENV/bin/python" ]]; then
    is_311 "$VENV/bin/python" || die "$VENV exists but its python is not 3.11; remove it and run this again"
    if line="$(installed)"; then
        echo "ready: .venv-ref/bin/python ($line)"
        exit 0
    fi
else
    python311="$(find_python311)"
    echo "creating .venv-ref with $python311"
    "$python311" -m venv "$VENV"
fi

pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch first and alone: its CPU build for 3.11 comes from the local wheel directory; transformers does
# not depend on torch, so the second install never brings another one.
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" "transformers==$TRANSFORMERS_VERSION" safetensors numpy

line="$(installed)" || die "$VENV: packages installed but the versions do not match (torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION)"
echo "ready: .venv-ref/bin/python ($line)"
