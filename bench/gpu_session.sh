#!/usr/bin/env bash
# Issue 16 on a fresh GPU machine in ONE call (about 6 minutes): the GPU tests, whole exports of nvfp4-mse,
# nvfp4-mse-wide and int4-w4a16 on 1 GPU against the copy floor (and ModelOpt's nvfp4 mse export when
# ModelOpt imports or its wheels are carried), the kernel microbenchmark; then bench/session_report.py writes the
# results files (bench/results/ formats) and the docs/benchmarks.md stanza. Everything lands under $OUT/kernels.
#
#   DIST_EXPORT_GIT=<sha> bash bench/gpu_session.sh
#   then, in the checkout:  python3 bench/session_report.py <fetched OUT>/kernels --install
#
# Order: [make-model on the GPU (seconds, not the CPU's 100 s) | GPU tests | wheel install] at the same time
# (none of them is a timing), then the exports (copy floor first, one model for every run), then the
# microbenchmark. Each part has a time limit so the whole stays inside BUDGET_S; the export benchmark skips a
# run that would not finish before its deadline (listed in the results), so there is always time left for
# the microbenchmark and the report.
# Env: OUT (/tmp/out), BUDGET_S (360), TESTS_S (limit of the tests: 2/5 of BUDGET_S, at most 150), KERNELS_S
# (60: kept for the microbenchmark), WHEELS (.whl: wheels installed where a module is missing), SITE (where they go,
# /tmp/gpu-session-site), TAG (h200-kernels3), ARCH/PRESET (qwen3/qwen3-8b), RECIPES
# (nvfp4-mse,nvfp4-mse-wide,int4-w4a16), REPEAT (2), DEVICE (cuda), TEST_GROUPS, TESTS=0 / EXPORTS=0 / KERNELS=0
# leave a part out. What does not fit is skipped and reported as not measured, in this order of priority: tests
# (in parallel with the model), nvfp4-mse x2, ModelOpt, nvfp4-mse-wide x2, int4-w4a16 x2; the microbenchmark has
# its own KERNELS_S at the end.
set -uo pipefail
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-360}
DEADLINE=$((T0 + BUDGET_S))
OUT=${OUT:-/tmp/out}
R="$OUT/kernels"
mkdir -p "$R"
WORK=${WORK:-/tmp/dist_export_bench}
ARCH=${ARCH:-qwen3}
PRESET=${PRESET:-qwen3-8b}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-h200-kernels3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/gpu-session-site}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DIST_EXPORT_CACHE=${DIST_EXPORT_CACHE:-/tmp/de-cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$SITE"  # $SITE: wheels the image lacks
log() { echo "[gpu_session +$(($(date +%s) - T0))s] $*" | tee -a "$R/session.log"; }
left() { echo $((DEADLINE - $(date +%s))); }

# ---- wheels (ModelOpt and what it needs): bench/install_missing_wheels.sh ----
# shellcheck source=bench/install_missing_wheels.sh
source "${BASH_SOURCE[0]%/*}/install_missing_wheels.sh"
install_wheels() { install_missing_wheels "$WHEELS" "$SITE" "$PY"; }

# ---- the model, generated once on the GPU and reused by every export ----
make_model() {
  local src="$WORK/src-$ARCH-$PRESET" t
  mkdir -p "$WORK"
  if [[ -f "$src/config.json" ]]; then echo '{"seconds": 0, "device": "reused"}' >"$R/make-model.json"; return 0; fi
  rm -rf "$src"
  t=$(date +%s.%N)
  "$PY" -m dist_export make-model --arch "$ARCH" --preset "$PRESET" --out "$src" --device "$DEVICE" \
    >"$R/make-model.txt" 2>&1 && sync || { echo "make-model failed" >>"$R/make-model.txt"; return 1; }
  "$PY" -c "import json,sys,time; json.dump({'seconds': time.time() - float(sys.argv[1]), 'device': sys.argv[2]}, \
open(sys.argv[3], 'w'))" "$t" "$DEVICE" "$R/make-model.json"
}

# ---- GPU tests: the kernels (compiled), the dispatch, GPU vs CPU exports, the NaN refusal on a GPU. Two groups
# run at the same time (the kernels' CPU references and the CPU exports of test_gpu take most of the time), each
# with pytest-xdist workers where it is installed ----
TEST_GROUPS=${TEST_GROUPS:-"tests/test_kernels.py;tests/test_kernel_dispatch.py tests/test_gpu.py tests/test_bad_inputs.py::test_nan_weight_on_gpu"}
gpu_tests() {
  local par=() i=0 pids=() files group rc=0
  "$PY" -c "import xdist" 2>/dev/null && par=(-n "${TEST_WORKERS:-3}")
  IFS=';' read -r -a groups <<<"$TEST_GROUPS"
  echo "${TEST_GROUPS//;/ } ${par[*]}" >"$R/gpu-tests.files"
  for group in "${groups[@]}"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=${TEST_THREADS:-3} timeout -k 5 "${TESTS_S:-$((BUDGET_S * 2 / 5 < 150 ? BUDGET_S * 2 / 5 : 150))}" "$PY" -m pytest -v -p no:cacheprovider \
      "${par[@]}" --basetemp="/tmp/gpu-session-pytest-$i" --junitxml="$R/gpu-tests-$i.xml" -o junit_family=xunit1 \
      --durations=10 $group >"$R/gpu-tests-$i.txt" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || rc=$?; done
  cat "$R"/gpu-tests-*.txt >"$R/gpu-tests.txt"
  echo "$rc" >"$R/gpu-tests.rc"
}

"$PY" - "$R/machine.json" "$TAG" "$BUDGET_S" <<'EOF'
import datetime, json, os, platform, sys
info = {"tag": sys.argv[2], "budget_s": int(sys.argv[3]), "python": platform.python_version(), "cpus": os.cpu_count(),
        "git": os.environ.get("DIST_EXPORT_GIT", "unknown"),
        "command": os.environ.get("SESSION_COMMAND", "DIST_EXPORT_GIT=... bash bench/gpu_session.sh"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
try:
    info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    import torch, transformers
    info.update(torch=torch.__version__, transformers=transformers.__version__)
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)}x {names[0]}"
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["import_error"] = repr(e)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF
nvidia-smi -L >"$R/nvidia-smi.txt" 2>&1
df -h /tmp >>"$R/nvidia-smi.txt" 2>&1
log "budget ${BUDGET_S}s; git ${DIST_EXPORT_GIT:-unknown}; start"

install_wheels >"$R/wheels.txt" 2>&1 &
W_PID=$!
M_PID=
if [[ "${EXPORTS:-1}" != 0 ]]; then make_model & M_PID=$!; fi
if [[ "${TESTS:-1}" != 0 ]]; then
  gpu_tests
  log "tests done (exit $(cat "$R/gpu-tests.rc")): $(for f in "$R"/gpu-tests-*.txt; do tail -1 "$f"; done | tr '\n' ' ')"
fi
wait "$W_PID"
"$PY" -c "import modelopt, json, sys; m = json.load(open(sys.argv[1])); m['modelopt'] = modelopt.__version__; \
json.dump(m, open(sys.argv[1], 'w'), indent=1)" "$R/machine.json" 2>>"$R/wheels.txt" || log "ModelOpt not importable"
if [[ -n "$M_PID" ]]; then
  wait "$M_PID" && log "make-model done: $(cat "$R/make-model.json")" || log "make-model failed: $(tail -2 "$R/make-model.txt")"
fi

# ---- whole exports: copy floor, then each recipe REPEAT times; ModelOpt's nvfp4 mse export once ----
if [[ "${EXPORTS:-1}" != 0 && -f "$R/make-model.json" ]]; then
  KEEP=${KERNELS_S:-60}
  [[ "${KERNELS:-1}" == 0 ]] && KEEP=10
  log "exports until $((DEADLINE - KEEP - T0))s"
  timeout -k 5 $(( $(left) - KEEP > 10 ? $(left) - KEEP : 10 )) "$PY" bench/bench_export.py --arch "$ARCH" \
    --preset "$PRESET" --workdir "$WORK" --device "$DEVICE" --ranks 1 --repeat "${REPEAT:-2}" \
    --recipes "${RECIPES:-nvfp4-mse,nvfp4-mse-wide,int4-w4a16}" --baselines modelopt \
    --baseline-recipes nvfp4-mse --deadline $((DEADLINE - KEEP)) --results "$R/export.json" --no-render \
    >"$R/export.txt" 2>&1
  log "exports done (exit $?): $(grep -c '"tool"' "$R/export.txt") runs"
  rm -rf "$WORK"/out-* "$WORK"/modelopt-* "$WORK/copy"
fi

# ---- the kernel microbenchmark: the largest weight (and the transposed one if there is time) ----
if [[ "${KERNELS:-1}" != 0 && "$(left)" -gt 15 ]]; then
  SHAPES=12288x4096
  [[ "$(left)" -gt 120 ]] && SHAPES=12288x4096,4096x12288
  log "kernels ($SHAPES), $(left)s left"
  timeout -k 5 $(( $(left) - 8 )) "$PY" bench/bench_kernels.py --shapes "$SHAPES" --out "$R/kernels.json" \
    ${KERNEL_ARGS:-} >"$R/kernels.txt" 2>&1
  log "kernels done (exit $?)"
fi

"$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); m['wall_s'] = int(sys.argv[2]); \
json.dump(m, open(sys.argv[1], 'w'), indent=1)" "$R/machine.json" $(($(date +%s) - T0))
"$PY" bench/session_report.py "$R" >"$R/report.txt" 2>&1 || log "report failed: $(tail -3 "$R/report.txt")"
log "end; stanza: $R/report/stanza.md"
cat "$R/report/stanza.md" 2>/dev/null | head -60
