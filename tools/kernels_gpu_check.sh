#!/usr/bin/env bash
# Issue 16 kernels on ONE GPU in one call (about 5-6 minutes, at most BUDGET_S = 450 s plus start-up):
#   1. bench/bench_kernels.py on a quiet GPU first (seconds per GB, fraction of the copy bandwidth, bit-exact vs
#      the torch path on the same GPU; every case on 12288x4096, 4096x12288 and 4096x4096);
#   2. the GPU tests: tests/test_kernels.py (every kernel compiled, against the CPU torch reference: random,
#      ragged, all-zero, tiny, huge-range, float32 range ends; div_by on every INT case and millions of NVFP4
#      pairs; fma_rn; search ties), tests/test_kernel_dispatch.py, tests/test_gpu.py (GPU vs CPU numerics, MSE
#      search and whole exports), tests/test_bad_inputs.py::test_nan_weight_on_gpu;
#   3. a summary: the four tracked cases against the 0.50 target, the pytest counts.
#
#   DIST_EXPORT_GIT=<commit> bash tools/kernels_gpu_check.sh      # from the repo root; OUT defaults to /tmp/out
#
# Results (names as in bench/results/, TAG = h200-kernels4 unless set; 5 files, copy them there as they are):
#   $OUT/$TAG.json               bench_kernels.py's JSON (machine, date, git, command, copy_bw, rows)
#   $OUT/$TAG-bench.txt          its output (one JSON line per row, any traceback)
#   $OUT/$TAG-gpu-tests.txt      the whole pytest output;  $OUT/$TAG-gpu-tests.xml  its junit xml
#   $OUT/$TAG-check.txt          this script's log: machine, versions, each step's exit code and time, summary
# Env: OUT, TAG, BUDGET_S (450), BENCH_S (170: the benchmark's limit; the tests get what is left, at most 260),
# PYTHON (python3), TEST_WORKERS (3, where pytest-xdist is installed), BENCH_ARGS (extra bench_kernels.py args).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
TAG=${TAG:-h200-kernels4}
BUDGET_S=${BUDGET_S:-450}
BENCH_S=${BENCH_S:-170}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/$TAG-check.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DIST_EXPORT_CACHE=${DIST_EXPORT_CACHE:-/tmp/de-cache}
export DIST_EXPORT_GIT=${DIST_EXPORT_GIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
say() { echo "[kernels_gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((T0 + BUDGET_S - $(date +%s))); }

say "machine and versions (code $DIST_EXPORT_GIT)"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, "gpus", torch.cuda.device_count())'
  "$PY" -c 'import pytest; print("pytest", pytest.__version__)'
  "$PY" -c 'import xdist; print("xdist", xdist.__version__)' 2>/dev/null || echo "no pytest-xdist: tests run serially"
  git status --short 2>/dev/null | head -20; } >>"$LOG" 2>&1

# ---- 1. microbenchmark (first: nothing else on the GPU) ----
say "1. bench/bench_kernels.py (limit ${BENCH_S} s)"
# shellcheck disable=SC2086
timeout -k 5 "$BENCH_S" "$PY" bench/bench_kernels.py --out "$OUT/$TAG.json" ${BENCH_ARGS:-} >"$OUT/$TAG-bench.txt" 2>&1
say "bench exit $? ($(grep -c '^{' "$OUT/$TAG-bench.txt") rows)"

# ---- 2. GPU tests ----
TESTS_S=$(left)
TESTS_S=$((TESTS_S > 260 ? 260 : TESTS_S))
par=()
"$PY" -c "import xdist" 2>/dev/null && par=(-n "${TEST_WORKERS:-3}")
say "2. GPU tests (limit ${TESTS_S} s, ${par[*]:-serial})"
if ((TESTS_S > 20)); then
  timeout -k 5 "$TESTS_S" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${par[@]}" --durations=15 \
    --junitxml="$OUT/$TAG-gpu-tests.xml" -o junit_family=xunit1 --basetemp=/tmp/kernels-gpu-check-pytest \
    tests/test_kernels.py tests/test_kernel_dispatch.py tests/test_gpu.py \
    "tests/test_bad_inputs.py::test_nan_weight_on_gpu" >"$OUT/$TAG-gpu-tests.txt" 2>&1
  say "pytest exit $? (124: stopped by the limit)"
else
  say "GPU tests not run: no time left"
fi

# ---- 3. summary ----
say "3. summary"
"$PY" - "$OUT/$TAG.json" >>"$LOG" 2>&1 <<'EOF'
import json, sys
try:
    res = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"no benchmark results: {e}")
    sys.exit(0)
print(f"copy bandwidth {res['copy_bw'] / 1e12:.2f} TB/s; {res['machine']}; git {res['git']}; {res['date']}")
print("| case | shape | kernel ms | s per GB | fraction of copy bw | torch ms | bit-exact |")
print("|---|---|---|---|---|---|---|")
for row in res["rows"]:
    torch_ms = f"{row['torch_s'] * 1e3:.2f}" if "torch_s" in row else "-"
    exact = {True: "yes", False: "NO"}.get(row.get("bit_exact"), "-")
    print(f"| {row['case']} | {'x'.join(map(str, row['shape']))} | {row['kernel_s'] * 1e3:.3f} | "
          f"{row['kernel_s_per_gb']:.4f} | {row['frac_copy_bw']:.2f} | {torch_ms} | {exact} |")
tracked = {"int4-g128 fold": (0.37, 0.45), "nvfp4 fold": (0.56, 0.66), "nvfp4 encode": (0.30, 0.39),
           "fp8-block128 encode": (0.55, 0.54)}
for case, (main, lost) in tracked.items():
    rows = [r for r in res["rows"] if r["case"] == case and r["shape"] == [12288, 4096]]
    if not rows:
        print(f"- {case}: not measured")
        continue
    f = rows[0]["frac_copy_bw"]
    print(f"- {case} 12288x4096: {f:.2f} of copy bw (main before: {main:.2f}, lost branch: {lost:.2f}; target 0.50:"
          f" {'met' if f >= 0.5 else 'NOT met'})")
bad = [f"{r['case']} {r['shape']}" for r in res["rows"] if r.get("bit_exact") is False]
print("bit-exact vs the torch path on this GPU: " + ("every row timed with the torch path" if not bad else
                                                     f"NOT for {bad}"))
EOF
{ echo "--- pytest summary"; grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|no tests ran|Timeout|Killed" \
    "$OUT/$TAG-gpu-tests.txt" 2>/dev/null | tail -30; } >>"$LOG"
say "done in $(($(date +%s) - T0)) s; files: $(cd "$OUT" && ls "$TAG"* | tr '\n' ' ')"
cat "$LOG"
