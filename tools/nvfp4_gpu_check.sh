#!/usr/bin/env bash
# Issue 15 on a fresh GPU machine in ONE call (about 1-3 minutes, one GPU): NVFP4 of ModelOpt-calibrated tiny
# models (llama-tiny, qwen3-moe-tiny; NVFP4_DEFAULT_CFG, W4A16_NVFP4_CFG) against ModelOpt 0.47's own CUDA export.
#
#   WHEELS=<folder of .whl> bash tools/nvfp4_gpu_check.sh    # from the repo root; WHEELS: ModelOpt and its needs
#
# 1. tests/test_modelopt_export.py::test_nvfp4_on_cuda_against_modelopt (asserts: --modelopt-kernels equals
#    ModelOpt's CUDA export bit for bit; our exact arithmetic gives the same bytes on CUDA as on CPU; counts of
#    elements where our exact arithmetic differs from ModelOpt, as it stands and with its global scale exact);
# 2. tools/nvfp4_stage_check.py: our fold on CUDA vs CPU stage by stage (block max, e4m3 scale, sq, gs);
# 3. tools/nvfp4_modelopt_gpu.py: replicas of ModelOpt's Triton kernel changing one operation at a time.
# Results: ONE file, $OUT/nvfp4-check.tar.gz, holding nvfp4-check/: check.txt (a section per step, the pytest
# summary and the JSON lines), pytest.txt (the whole pytest output), pytest.xml, report.jsonl (test 1's counts),
# stage.txt, replica.txt, wheels.txt. Its last lines are printed too.
# Env: OUT (/tmp/out), WHEELS (.whl: wheels installed only where their module is missing, into SITE, by
# bench/install_missing_wheels.sh), SITE (/tmp/gpu-session-site, shared with bench/gpu_session.sh), BUDGET_S (240).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
WORK=$(mktemp -d)
R="$WORK/nvfp4-check"
mkdir -p "$OUT" "$R"
F="$R/check.txt"
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/gpu-session-site}
PY=${PYTHON:-python3}
DEADLINE=$((T0 + ${BUDGET_S:-240}))
export PYTHONUNBUFFERED=1 DIST_EXPORT_CACHE=${DIST_EXPORT_CACHE:-/tmp/de-cache}
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}:$SITE"
section() { echo "=== $* (+$(($(date +%s) - T0)) s)" >>"$F"; }
left() { local s=$((DEADLINE - $(date +%s))); echo $((s > 10 ? s : 10)); }
# shellcheck source=bench/install_missing_wheels.sh
source "${BASH_SOURCE[0]%/*}/../bench/install_missing_wheels.sh"

section "machine"
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } >>"$F" 2>&1
install_missing_wheels "$WHEELS" "$SITE" "$PY" >"$R/wheels.txt" 2>&1
tail -3 "$R/wheels.txt" >>"$F"
"$PY" -c 'import torch, transformers, modelopt, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "modelopt", modelopt.__version__, "triton", triton.__version__)' >>"$F" 2>&1

section "1. pytest test_nvfp4_on_cuda_against_modelopt (report lines follow the test summary)"
DIST_EXPORT_GPU_REPORT="$R/report.jsonl" timeout -k 5 "$(left)" "$PY" -m pytest -q -p no:cacheprovider -rA \
  --junitxml="$R/pytest.xml" "tests/test_modelopt_export.py::test_nvfp4_on_cuda_against_modelopt" >"$R/pytest.txt" 2>&1
echo "pytest exit: $?" >>"$F"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|^E  |passed|failed|skipped" "$R/pytest.txt" | tail -30 >>"$F"
cat "$R/report.jsonl" >>"$F" 2>/dev/null

section "2. tools/nvfp4_stage_check.py"
timeout -k 5 "$(left)" "$PY" tools/nvfp4_stage_check.py >"$R/stage.txt" 2>&1
echo "stage check exit: $?" >>"$F"
grep '^{' "$R/stage.txt" >>"$F"

section "3. tools/nvfp4_modelopt_gpu.py"
timeout -k 5 "$(left)" "$PY" tools/nvfp4_modelopt_gpu.py >"$R/replica.txt" 2>&1
echo "replica check exit: $?" >>"$F"
grep '^{' "$R/replica.txt" >>"$F"
section "done"
tar -czf "$OUT/nvfp4-check.tar.gz" -C "$WORK" nvfp4-check
tail -c 3000 "$F"
echo "results: $OUT/nvfp4-check.tar.gz ($(du -h "$OUT/nvfp4-check.tar.gz" | cut -f1))"
rm -rf "$WORK"
