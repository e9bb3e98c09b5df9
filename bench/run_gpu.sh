#!/usr/bin/env bash
# What we run on a lent GPU machine (see docs/benchmarks.md): GPU tests, then the benchmark.
#   PART=tests|cheap|heavy|cheap+heavy+tests  REPEAT=2  [CHEAP_ARGS=...] [HEAVY_ARGS=--no-baselines]  bench/run_gpu.sh
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
bench() {  # $1 recipe, $2 results name, then extra bench arguments
  python3 bench/bench_export.py --recipes "$1" --ranks "${RANKS:-1,2}" --repeat "${REPEAT:-2}" "${@:3}" \
    --results "$OUT/$2.json" 2>&1 | tail -40
}
case "${PART:-tests}" in
  *cheap*) bench fp8-block "results-cheap" ${CHEAP_ARGS:-} ;;
esac
case "${PART:-tests}" in
  *heavy*) bench nvfp4-mse "results-heavy" ${HEAVY_ARGS:-} ;;
esac
case "${PART:-tests}" in
  *tests*) python3 -m pytest -q -x tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu-tests.txt" ;;
esac
