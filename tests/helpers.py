"""Test helpers (imported by the tests as `from helpers import ...`; conftest.py holds only fixtures): the
synthetic models, folder hashes, and runs of the real CLI as one process or under torchrun."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_dir(name: str) -> str:
    from dist_export.sources.synthetic import ensure_synthetic

    return ensure_synthetic(name)


def folder_hashes(path) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_same_export_of_other_source(a, b) -> None:
    """Two exports of the same weights read from different sources (a folder and its dequantized copy, a live
    model and its checkpoint): every file sha256-identical except dist_export.json, whose run fingerprint names
    the source's own files; the rest of the two records must be equal."""
    ha, hb = folder_hashes(a), folder_hashes(b)
    assert {k: v for k, v in ha.items() if k != "dist_export.json"} == \
        {k: v for k, v in hb.items() if k != "dist_export.json"}
    records = []
    for path in (a, b):
        with open(os.path.join(path, "dist_export.json")) as f:
            record = json.load(f)
        record["fingerprint"].pop("source")
        records.append(record)
    assert records[0] == records[1]


def run_cli(*args, env=None, timeout=300, check=True, cwd=REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "dist_export", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-export {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(nproc: int, *args, env=None, timeout=300, extra=(), check=True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "dist_export", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def cli_in_process(capsys, *argv) -> tuple[int, str, str]:
    """`dist-export ARGV` in this process (no second torch import: fast on 2 cores), the root logger's handlers
    and level restored afterwards; returns (exit code as `python -m dist_export` would exit, stdout, stderr)."""
    import logging

    from dist_export.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)  # setup_logging routes warnings through logging: not for the test process
    out, err = capsys.readouterr()
    return rc, out, err
