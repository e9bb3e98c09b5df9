#!/usr/bin/env bash
# Print the python of a venv holding nvidia-modelopt 0.47.0 (made once, cached under ~/.cache/dist_export-ci).
# It sees the system torch and transformers (--system-site-packages) and changes neither. ModelOpt is installed
# without its dependency resolver: its runtime imports are named here (antlr4 4.9.3 is the runtime omegaconf
# 2.3's parser was generated with; the system's newer antlr4 stays as it is outside the venv).
set -euo pipefail
VENV="${DIST_EXPORT_MODELOPT_VENV:-$HOME/.cache/dist_export-ci/venv-modelopt-0.47.0}"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock" && flock 9  # one build at a time (parallel CI runs, helpers)
if ! "$VENV/bin/python" -c "import modelopt.torch.quantization, modelopt.torch.export" >/dev/null 2>&1; then
  rm -rf "$VENV"
  python3 -m venv --system-site-packages "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --no-deps nvidia-modelopt==0.47.0 omegaconf==2.3.0 \
    antlr4-python3-runtime==4.9.3 nvidia-ml-py pulp==3.3.2 ninja >&2
  "$VENV/bin/python" -c "import modelopt.torch.quantization, modelopt.torch.export" >&2
fi
echo "$VENV/bin/python"
