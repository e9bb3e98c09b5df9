#!/usr/bin/env bash
# Prints the python of a cached consumer venv with compressed-tensors 0.20.1 (the oracle of
# tests/test_compressed_tensors.py and tests/test_source_dequant.py). --system-site-packages: the system torch and
# transformers are used unchanged; compressed-tensors is installed --no-deps with its one missing need (loguru).
set -euo pipefail
VENV="${HOME}/.cache/dist_export-ci/venvs/ct"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock" && flock 9  # one build at a time (parallel CI runs, helpers)
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import compressed_tensors" >/dev/null 2>&1; then
  python3 -m venv --system-site-packages "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --no-deps compressed-tensors==0.20.1 loguru >&2
fi
echo "$VENV/bin/python"
