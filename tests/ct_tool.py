"""Run a snippet under a Python that has compressed-tensors (a consumer venv, never a dependency of ours).

The interpreter is `$DIST_EXPORT_CT_PYTHON`, else the first of the known venv paths that exists; tests that need
it skip cleanly where there is none (`.ci/run` creates one under ~/.cache/dist_export-ci).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

_CANDIDATES = (os.path.expanduser("~/.cache/dist_export-ci/venvs/ct/bin/python"), "/work/venvs/ct/bin/python",
               "/work/venvs/qs/bin/python")


@functools.lru_cache(maxsize=None)
def _has_ct(python: str) -> bool:
    """A venv whose compressed-tensors install failed (CI goes on without it) is no candidate."""
    proc = subprocess.run([python, "-c", "import compressed_tensors"], capture_output=True, timeout=120)
    return proc.returncode == 0


def ct_python() -> str | None:
    env = os.environ.get("DIST_EXPORT_CT_PYTHON")
    if env:
        return env
    for path in _CANDIDATES:
        if os.path.exists(path) and _has_ct(path):
            return path
    try:
        import compressed_tensors  # noqa: F401

        return sys.executable
    except ImportError:
        return None


def run_ct(script: str, *args: str, timeout: int = 300) -> str:
    """Run `script` with compressed-tensors importable (skips the test where none is installed)."""
    python = ct_python()
    if python is None:
        pytest.skip("compressed-tensors is not installed (set DIST_EXPORT_CT_PYTHON to a Python that has it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"compressed-tensors script failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc.stdout
