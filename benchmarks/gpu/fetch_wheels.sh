#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels benchmarks/gpu/run.sh installs on the GPU machine: the
# packages its image lacks, plus flax/optax/orbax at this checkout's versions (the image's may differ).
# Versions are read from this checkout's .venv so both machines run the same code. Output: .whl/
# (git-ignored through .git/info/exclude; carried with `carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "fetch_wheels: no .venv here; run scripts/setup.sh first" >&2; exit 1; }
PACKAGES=(tokamax qwix pydantic pydantic-core annotated-types typing-inspection typing-extensions immutabledict
          einshape omegaconf antlr4-python3-runtime grain array-record portpicker flax optax orbax-checkpoint)
if [[ -d .git/info ]]; then   # a git checkout: keep the wheels out of commits
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$name==$version" \
    2> >(grep -v "^WARNING: Location" >&2)
done
ls .whl
du -sh .whl
