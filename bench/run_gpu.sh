#!/usr/bin/env bash
# What we run on a lent GPU machine (see docs/benchmarks.md): GPU tests, then the benchmark.
#   PART=tests|cheap|heavy  bench/run_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DIST_EXPORT_CACHE=/tmp/de-cache
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed"
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/machine.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/machine.txt"
df -h /tmp | tee -a "$OUT/machine.txt"
case "${PART:-tests}" in
  tests)
    python3 -m pytest -q -x tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu-tests.txt" ;;
  cheap)
    python3 bench/bench_export.py --recipes fp8-block --results "$OUT/results-cheap.json" 2>&1 | tail -40 ;;
  heavy)
    python3 bench/bench_export.py --recipes nvfp4-mse --results "$OUT/results-heavy.json" 2>&1 | tail -40 ;;
esac
