"""Several ranks: byte-identical output for every world size, torchrun and multi-node launches, shared amax
split across ranks, and each rank reading only its own items."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import REPO, folder_hashes, model_dir, run_cli, run_torchrun
from multirank import run_ranks

CASES = [("synthetic:llama-tiny", "int4-w4a16"), ("synthetic:llama-tiny", "fp8-block"),
         ("synthetic:llama-tiny", "nvfp4"), ("synthetic:qwen3-moe-tiny", "int4-w4a16"),
         ("synthetic:qwen3-moe-tiny", "fp8-block"), ("synthetic:qwen3-moe-tiny", "nvfp4")]
SHARD = "40KB"  # several shards even for tiny models, so every rank owns some


def _export_on_ranks(ctx, src, out, recipe, calib, fmt="vllm-fq"):
    from dist_export.api import export

    s = export(src, out, recipe=recipe, format=fmt, calib=calib, max_shard_size=SHARD, ctx=ctx)
    return {"bytes_read": s["ranks"][ctx.rank]["bytes_read"], "items": s["ranks"][ctx.rank]["items"]}


def _calibrate(src, recipe, tmp_path):
    if recipe not in ("nvfp4", "fp8"):
        return None
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    path = str(tmp_path / f"calib-{recipe}.safetensors")
    calibrate(src, load_recipe(recipe), path, random_tokens=True, num_samples=2, seq_len=16)
    return path


def _single(src, out, recipe, calib, fmt="vllm-fq"):
    from dist_export.api import export

    export(src, out, recipe=recipe, format=fmt, calib=calib, max_shard_size=SHARD)
    return folder_hashes(out)


def _record_free(hashes):
    return {k: v for k, v in hashes.items()}


@pytest.mark.parametrize("model,recipe", CASES)
def test_world_sizes_give_identical_bytes(model, recipe, tmp_path):
    src = model_dir(model)
    calib = _calibrate(src, recipe, tmp_path)
    ref = _single(src, str(tmp_path / "ws1"), recipe, calib)
    assert len([f for f in ref if f.startswith("model-")]) >= 3, ref
    for ws in (2, 3):
        out = str(tmp_path / f"ws{ws}")
        results = run_ranks(ws, _export_on_ranks, src, out, recipe, calib, tmp_path=tmp_path)
        assert all(status == "ok" for status, _ in results), results
        assert folder_hashes(out) == ref, f"world size {ws} differs from 1"
        # each rank read exactly the bytes of the items it owns, and together every item once
        from dist_export.sources.checkpoint import SourceCheckpoint

        total = sum(m.nbytes for m in SourceCheckpoint(src).tensors.values())
        assert sum(v["bytes_read"] for _, v in results) == total
        assert all(v["items"] > 0 for _, v in results)
    rerun = _single(src, str(tmp_path / "rerun"), recipe, calib)
    assert rerun == ref


def test_shared_amax_group_split_across_ranks(tmp_path):
    """Experts of one layer share a weight amax; with tiny shards the members sit on different ranks."""
    import yaml

    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.output_formats import get_output_format

    recipe_path = tmp_path / "shared-experts.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "shared-experts", "rules": [{"match": ["*"], "weight": {"format": "nvfp4"}}],
        "share_weight_amax": ["experts", "qkv"]}))
    src = model_dir("synthetic:qwen3-moe-tiny")
    plan = build_plan(SourceCheckpoint(src).tensors, load_recipe(str(recipe_path)), get_output_format("vllm-fq"), 3,
                      40_000)
    owner = plan.owners()
    split = [g for g, members in plan.groups.items() if len({owner[m] for m in members}) > 1]
    assert split, "test setup: no group spans ranks"
    ref = _single(src, str(tmp_path / "ws1"), str(recipe_path), None)
    results = run_ranks(3, _export_on_ranks, src, str(tmp_path / "ws3"), str(recipe_path), None, tmp_path=tmp_path)
    assert all(s == "ok" for s, _ in results), results
    assert folder_hashes(str(tmp_path / "ws3")) == ref


def test_one_shard_written_by_every_rank(tmp_path):
    """A single model.safetensors (default shard size): every one of 3 ranks writes items into it, and the file
    equals the single-process one."""
    src = model_dir("synthetic:qwen3-moe-tiny")
    from dist_export.api import export

    export(src, str(tmp_path / "ws1"), recipe="int4-w4a16")
    ref = folder_hashes(str(tmp_path / "ws1"))
    assert "model.safetensors" in ref

    results = run_ranks(3, _export_single_shard, src, str(tmp_path / "ws3"), tmp_path=tmp_path)
    assert all(status == "ok" for status, _ in results), results
    assert all(items > 0 for _, items in results), results
    assert folder_hashes(str(tmp_path / "ws3")) == ref


def _export_single_shard(ctx, src, out):
    from dist_export.api import export

    return export(src, out, recipe="int4-w4a16", ctx=ctx)["ranks"][ctx.rank]["items"]


@pytest.mark.parametrize("fmt, job_wide", [
    ("vllm-fq", "vllm-fq: serve this export on a GPU"),  # vllm_fq.check_items
    ("fp8-block", "quantized weights have a dimension that is not a multiple of 128"),  # fp8_block.check_items
])
def test_job_wide_warnings_once_rank_warnings_per_rank(fmt, job_wide, tmp_path):
    """`--nproc-per-node 2`: a plan-time warning about the whole job (every rank plans the same items) is one
    line, from rank 0; a warning one rank raises about itself (the injected log line of rank 1) still shows."""
    proc = run_cli("export", "--nproc-per-node", "2", "--model", model_dir("synthetic:llama-tiny"), "--recipe",
                   "fp8-block", "--format", fmt, "--out", str(tmp_path / "out"), "--max-shard-size", SHARD,
                   env={"DIST_EXPORT_FAULT": "talk:1:1"})
    lines = proc.stderr.splitlines()
    job = [line for line in lines if job_wide in line]
    assert len(job) == 1 and "[rank 0] WARNING" in job[0], "\n".join(job) or proc.stderr[-3000:]
    own = [line for line in lines if "injected log line from rank 1" in line]
    assert len(own) == 1 and "[rank 1] WARNING" in own[0], proc.stderr[-3000:]


def test_torchrun_standalone_matches_single_process(tmp_path):
    src = model_dir("synthetic:qwen3-moe-tiny")
    ref = _single(src, str(tmp_path / "ws1"), "fp8-block", None, fmt="fp8-block")
    proc = run_torchrun(2, "export", "--model", src, "--recipe", "fp8-block", "--format", "fp8-block",
                        "--max-shard-size", SHARD, "--out", str(tmp_path / "tr2"))
    assert folder_hashes(str(tmp_path / "tr2")) == ref
    # every log line carries its rank; rank 0 prints the summary with per-rank numbers
    assert "[rank 0]" in proc.stderr and "rank 1:" in proc.stderr and "slowest rank" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_two_procs_c10d(tmp_path):
    """Two torchrun agents (one per 'node') meeting through a c10d rendezvous on localhost."""
    src = model_dir("synthetic:llama-tiny")
    ref = _single(src, str(tmp_path / "ws1"), "int4-w4a16", None)
    port = _free_port()
    out = str(tmp_path / "multinode")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=dist-export-test",
           "-m", "dist_export", "export", "--model", src, "--recipe", "int4-w4a16", "--max-shard-size", SHARD,
           "--out", out]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [a.communicate(timeout=240) for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[1][-2000:] for o in outs]
    assert folder_hashes(out) == ref
    # the plan really had two nodes (LOCAL_WORLD_SIZE=2 of WORLD_SIZE=4) and every rank wrote items
    plan_line = next(ln for o in outs for ln in o[1].splitlines() if "dist_export.api: plan:" in ln)
    assert "2 node(s)" in plan_line, plan_line
    items = [int(x) for x in re.search(r"per-rank items \[([\d, ]+)\]", plan_line).group(1).split(",")]
    assert len(items) == 4 and all(items), plan_line


def test_slurm_one_task_per_gpu_without_torchrun(tmp_path):
    """srun --ntasks=2 python -m dist_export ...: ranks from SLURM_PROCID/STEP_NUM_TASKS/LOCALID (the variables
    srun sets for each task of its step), head node from the node list (scontrol is absent here, so the list
    itself is used)."""
    src = model_dir("synthetic:llama-tiny")
    ref = _single(src, str(tmp_path / "ws1"), "int4-w4a16", None)
    out = str(tmp_path / "slurm")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                   SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_export", "export", "--model", src, "--recipe",
                                       "int4-w4a16", "--max-shard-size", SHARD, "--out", out], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert folder_hashes(out) == ref
    assert "[rank 1]" in outs[1][1] or "rank 1:" in outs[0][1]


def test_launch_scripts(tmp_path):
    """launch/torchrun.sh (2 processes, and SINGLE=1) and launch/slurm.sbatch, the latter with stand-ins for
    srun and scontrol on PATH (one node), give the single-process bytes."""
    src = model_dir("synthetic:llama-tiny")
    ref = _single(src, str(tmp_path / "ws1"), "int4-w4a16", None)
    args = ["export", "--model", src, "--recipe", "int4-w4a16", "--max-shard-size", SHARD]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    for name, env in (("two", {"NPROC": "2"}), ("single", {"SINGLE": "1"})):
        out = str(tmp_path / name)
        proc = subprocess.run(["bash", "launch/torchrun.sh", *args, "--out", out], cwd=REPO, env={**base, **env},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert folder_hashes(out) == ref, name
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    # srun stand-in: drop srun's own options, run the task once (one node)
    (shims / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    out = str(tmp_path / "slurm")
    env = {**base, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "777", "GPUS_PER_NODE": "2", "RDZV_PORT": str(_free_port())}
    proc = subprocess.run(["bash", "launch/slurm.sbatch", *args, "--out", out], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "1 nodes x 2 GPUs" in proc.stdout
    assert folder_hashes(out) == ref
