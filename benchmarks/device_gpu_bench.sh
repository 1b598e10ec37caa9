#!/usr/bin/env bash
# The GPU measurement as one call on the lent GPU machine (whose image has torch but not open_clip, pydantic or
# webdataset, and which reaches no registry). Prepare here, once:
#
#   bash benchmarks/fetch_device_wheels.sh          # the missing wheels into .whl/ (git-ignored)
#
# then call the device tool's run with:  command "bash benchmarks/device_gpu_bench.sh", carry [".whl"],
# timeout_s 560. It installs the carried wheels into /tmp/site, imports cirbench from this checkout (nothing is
# built there), and runs benchmarks/gpu_bench.py within BUDGET_S (default 420 s, so a 15-minute lease holds the
# machine's start, this run and a short rerun); results.json, results.md and the log land in $OUT after every
# stage. Any gpu_bench.py variable passes through (STAGES=encode_L,gallery BUDGET_S=300 bash ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cirbench-device-out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY="${PY:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # cirbench's core, straight from the checkout
"$PY" - <<'PYEOF' || { echo "error: cirbench's benchmark cannot be imported here (run benchmarks/fetch_device_wheels.sh and carry .whl)" >&2; exit 1; }
import importlib
for name in ("torch", "torchvision", "open_clip", "cirbench.bench", "cirbench.encode", "cirbench.feature_cache"):
    mod = importlib.import_module(name)
    print(f"{name:22} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
PYEOF
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" benchmarks/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
