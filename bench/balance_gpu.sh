#!/usr/bin/env bash
# Issue 17 on a GPU machine, end to end in one command (fresh machine, CUDA torch; every GPU it sees):
#   OUT=/tmp/out [MODEL=synthetic:qwen3-moe-small] [RECIPE=nvfp4-mse] [NPROC=<GPUs>] bench/balance_gpu.sh
# 1. export on 1 GPU and on NPROC GPUs (--nproc-per-node): wall seconds, measured seconds per rank and their
#    max/mean (the run summary's seconds_balance), and whether every output file is sha256-identical;
# 2. kill/resume with shared shard files: rank 1 SIGKILLed before its 10th item at NPROC ranks, then --resume at
#    NPROC ranks: exit codes and sha256 identity with the uninterrupted run.
# Results: $OUT/balance.json (and the logs next to it). On CPU: DEVICE=cpu NPROC=2 MODEL=synthetic:qwen3-moe-tiny.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DIST_EXPORT_CACHE=${DIST_EXPORT_CACHE:-/tmp/de-cache} PYTHONPATH=${PYTHONPATH:-$PWD}
MODEL=${MODEL:-synthetic:qwen3-moe-small}
RECIPE=${RECIPE:-nvfp4-mse}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
WORK=${WORK:-/tmp/balance-work}
rm -rf "$WORK" && mkdir -p "$WORK"
run() {  # $1 name, then export arguments; writes $OUT/$1.log and $WORK/$1.summary.json
  local name=$1; shift
  local t0=$(date +%s.%N)
  python3 -m dist_export export --model "$MODEL" --recipe "$RECIPE" --device "$DEVICE" "$@" \
    --summary-json "$WORK/$name.summary.json" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall=$(python3 -c "import time; print(round($(date +%s.%N) - $t0, 2))") s"
  return $rc
}
run one --out "$WORK/one"
run many --nproc-per-node "$NPROC" --out "$WORK/many"
DIST_EXPORT_FAULT=kill:1:10 run killed --nproc-per-node "$NPROC" --out "$WORK/resumed" --dead-timeout 10
run resume --nproc-per-node "$NPROC" --out "$WORK/resumed" --resume
python3 - "$WORK" "$NPROC" "$OUT/balance.json" <<'EOF'
import hashlib, json, os, sys
work, nproc, dest = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def hashes(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, f))} if os.path.isdir(d) else {}
def summary(name):
    p = os.path.join(work, f"{name}.summary.json")
    return json.load(open(p)) if os.path.isfile(p) else None
one, many, resume = (summary(n) for n in ("one", "many", "resume"))
ref = hashes(os.path.join(work, "one"))
res = {"nproc": nproc,
       "one_wall_s": one and one["wall_seconds"], "many_wall_s": many and many["wall_seconds"],
       "many_seconds_per_rank": many and many["seconds_balance"]["seconds"],
       "many_seconds_max_over_mean": many and many["seconds_balance"]["imbalance"],
       "many_items_per_rank": many and [r["items"] for r in many["ranks"]],
       "many_identical_to_one": bool(ref) and hashes(os.path.join(work, "many")) == ref,
       "resume_identical_to_one": bool(ref) and resume is not None and hashes(os.path.join(work, "resumed")) == ref}
json.dump(res, open(dest, "w"), indent=1)
print(json.dumps(res, indent=1))
EOF
