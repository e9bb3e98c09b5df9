"""Shared fixtures: one synthetic-model cache for all xdist workers. Helpers live in helpers.py."""
from __future__ import annotations

import os

import pytest

# Tests import these from helpers.py; kept importable here only for branches written before the move.
from helpers import REPO, folder_hashes, model_dir, run_cli, run_torchrun  # noqa: F401,E402


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    # The parent of the per-worker base temp is shared by every xdist worker; generation is flock-guarded.
    root = tmp_path_factory.getbasetemp().parent / "dist_export_cache"
    root.mkdir(exist_ok=True)
    os.environ["DIST_EXPORT_CACHE"] = str(root)
    return root
