#!/usr/bin/env bash
# Issue 15 on a fresh GPU machine in ONE call (about 2-3 minutes, one GPU): NVFP4 of ModelOpt-calibrated tiny
# models (llama-tiny, qwen3-moe-tiny; NVFP4_DEFAULT_CFG, W4A16_NVFP4_CFG) against ModelOpt 0.47's own CUDA export.
#
#   bash tools/nvfp4_gpu_check.sh          # from the repo root; carry .whl (ModelOpt + deps) where the image lacks it
#
# 1. tests/test_modelopt_export.py::test_nvfp4_on_cuda_against_modelopt (asserts: --modelopt-kernels equals
#    ModelOpt's CUDA export bit for bit; our exact arithmetic gives the same bytes on CUDA as on CPU; counts of
#    elements where our exact arithmetic differs from ModelOpt, as it stands and with its global scale exact);
# 2. tools/nvfp4_stage_check.py: our fold on CUDA vs CPU stage by stage (block max, e4m3 scale, sq, gs);
# 3. tools/nvfp4_modelopt_gpu.py: replicas of ModelOpt's Triton kernel changing one operation at a time.
# Everything goes into ONE file, $OUT/nvfp4-check.txt (a section per step; JSON lines where the step prints
# JSON). Env: OUT (/tmp/out), WHEELS (.whl: wheels installed only where their module is missing, into SITE, by
# bench/install_missing_wheels.sh),
# SITE (/tmp/gpu-session-site, shared with bench/gpu_session.sh), BUDGET_S (240).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
F="$OUT/nvfp4-check.txt"
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/gpu-session-site}
PY=${PYTHON:-python3}
DEADLINE=$((T0 + ${BUDGET_S:-240}))
export PYTHONUNBUFFERED=1 DIST_EXPORT_CACHE=${DIST_EXPORT_CACHE:-/tmp/de-cache}
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}:$SITE"
section() { echo "=== $* (+$(($(date +%s) - T0)) s)" >>"$F"; }
left() { local s=$((DEADLINE - $(date +%s))); echo $((s > 10 ? s : 10)); }

section "machine"
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null; } >>"$F" 2>&1
# shellcheck source=bench/install_missing_wheels.sh
source "${BASH_SOURCE[0]%/*}/../bench/install_missing_wheels.sh"
install_missing_wheels "$WHEELS" "$SITE" "$PY" >>"$F" 2>&1
"$PY" -c 'import torch, transformers, modelopt, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "modelopt", modelopt.__version__, "triton", triton.__version__)' >>"$F" 2>&1

section "1. pytest test_nvfp4_on_cuda_against_modelopt (report lines follow the test output)"
REPORT=$(mktemp)
DIST_EXPORT_GPU_REPORT="$REPORT" timeout -k 5 "$(left)" "$PY" -m pytest -q -p no:cacheprovider -rA \
  "tests/test_modelopt_export.py::test_nvfp4_on_cuda_against_modelopt" 2>&1 | tail -40 >>"$F"
echo "pytest exit: ${PIPESTATUS[0]}" >>"$F"
cat "$REPORT" >>"$F"
rm -f "$REPORT"

section "2. tools/nvfp4_stage_check.py"
timeout -k 5 "$(left)" "$PY" tools/nvfp4_stage_check.py >>"$F" 2>&1 || echo "stage check exit: $?" >>"$F"

section "3. tools/nvfp4_modelopt_gpu.py"
timeout -k 5 "$(left)" "$PY" tools/nvfp4_modelopt_gpu.py >>"$F" 2>&1 || echo "replica check exit: $?" >>"$F"
section "done"
tail -c 2000 "$F"
