#!/usr/bin/env bash
# One call on the GPU machine (the device tool), inside its 10 minutes: install the carried wheels,
# then benchmarks/gpu/bench.py, whose last output is the table. Prepare the wheels here first:
#
#   benchmarks/gpu/fetch_wheels.sh          # -> .whl/ (13 MB), git-ignored
#   device run: command "benchmarks/gpu/run.sh", carry [".whl"], timeout_s 600
#
# Extra arguments go to bench.py (e.g. --only moe,attention --budget-s 300). The rows also land in
# $OUT/bench.json and the whole log in $OUT/bench.log when $OUT is set (the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
export PYTHONUNBUFFERED=1
site=/tmp/cascade-site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "run.sh: installing .whl/ failed" >&2; exit 1; }
fi
# tokamax imports xprof (a 100 MB profiler) for its own benchmarking only; where the image lacks it, a stub
# module that refuses to run stands in, so the kernels import.
stubs=/tmp/cascade-stubs
if ! PYTHONPATH="$site" python3 -c "import xprof" 2>/dev/null; then
  mkdir -p "$stubs/xprof/cli"
  : >"$stubs/xprof/__init__.py"; : >"$stubs/xprof/cli/__init__.py"
  printf 'def get_kernel_stats_tool(*args, **kwargs):\n    raise RuntimeError("xprof is a stub here")\n' \
    >"$stubs/xprof/cli/tools.py"
fi
export PYTHONPATH="$PWD:$site:$stubs${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || true
python3 -c "import jax, flax, optax, tokamax; print('jax', jax.__version__, 'flax', flax.__version__, \
'tokamax', tokamax.__version__, jax.devices())" || { echo "run.sh: imports failed (see above)" >&2; exit 1; }
elapsed=$(( $(date +%s) - start ))
budget=$(( 540 - elapsed ))   # 600 s per call, less set-up so far, less a minute for the table and transfers
out=${OUT:-/tmp}; mkdir -p "$out"
python3 benchmarks/gpu/bench.py --budget-s "$budget" --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
exit "${PIPESTATUS[0]}"
