# Sourced (not run) by bench/gpu_session.sh and tools/nvfp4_gpu_check.sh on a fresh GPU machine, before any
# Python work. Defines install_missing_wheels WHEELS SITE [PY]: of the .whl files in the folder WHEELS, pip installs
# (no index, no dependencies) only those whose import module the image lacks, into SITE, which the caller puts
# last on PYTHONPATH; nothing of the image is replaced or written. Prints one line saying what it installs.
# shellcheck shell=bash
install_missing_wheels() {
  local wheels=$1 site=$2 py=${3:-python3} want
  [[ -d "$wheels" ]] || { echo "no $wheels folder: nothing to install"; return 0; }
  want=$("$py" -c '
import importlib.util, os, sys
names = {"nvidia_modelopt": "modelopt", "antlr4_python3_runtime": "antlr4", "nvidia_ml_py": "pynvml",
         "markdown_it_py": "markdown_it"}
for w in sorted(os.listdir(sys.argv[1])):
    dist = w.split("-")[0]
    if w.endswith(".whl") and importlib.util.find_spec(names.get(dist, dist)) is None:
        print(os.path.join(sys.argv[1], w))
' "$wheels")
  echo "missing here, installing into $site: ${want:-nothing}" | tr '\n' ' '; echo
  [[ -n "$want" ]] || return 0
  # shellcheck disable=SC2086
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $want
}
