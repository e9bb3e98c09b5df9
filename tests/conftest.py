"""Shared fixtures: one synthetic-model cache for all xdist workers. Helpers live in helpers.py."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (its module first imported). On a machine without a GPU
# it is set before any test can import the kernels, so which tests share a process (xdist) never decides whether a
# kernel test runs in the interpreter or fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
# CPU tensors never take a kernel (numerics.kernels.enabled), so nothing else changes. Not in the consumer and
# ModelOpt venvs (.ci/run): their tests call none of our kernels, and vLLM or ModelOpt must see the environment as is.
_OTHER_TOOLS = any(importlib.util.find_spec(m) is not None for m in ("vllm", "modelopt"))
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available() and not _OTHER_TOOLS:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import these from helpers.py; kept importable here only for branches written before the move.
from helpers import REPO, folder_hashes, model_dir, run_cli, run_torchrun  # noqa: F401,E402


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    # The parent of the per-worker base temp is shared by every xdist worker; generation is flock-guarded.
    root = tmp_path_factory.getbasetemp().parent / "dist_export_cache"
    root.mkdir(exist_ok=True)
    os.environ["DIST_EXPORT_CACHE"] = str(root)
    return root
