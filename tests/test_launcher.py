"""`dist-export export --nproc-per-node N`: the built-in launcher (no torchrun) and the in-pipeline shared amax.

The launcher must give the bytes of a single-process export, end a job whose rank was killed quickly (peers on
the same host see the process vanish within about a second, well before the heartbeat timeout), name the rank,
leave no index, and let --resume finish the job. Start-up is bounded too (issue 13, item 5): a rank killed or
stopped before or while the process group forms is named within --dead-timeout, Ctrl-C then is one line, a
SIGKILLed launcher takes its ranks with it, and Slurm variables without srun do not make a rank wait for peers. Its parent process must not import torch (that is the point:
its start-up costs nothing that does not also happen in a single-process run).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, folder_hashes, model_dir, run_cli

MODEL = "synthetic:llama-tiny"
RECIPE = "nvfp4-mse"  # shares the weight amax of q/k/v and gate/up: exercises the in-pipeline groups
SHARD = "20KB"


def _export(out, *extra, env=None, check=True):
    return run_cli("export", "--model", model_dir(MODEL), "--recipe", RECIPE, "--max-shard-size", SHARD,
                   "--out", str(out), *extra, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=240, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("launcher-ref") / "ws1"
    _export(out)
    hashes = folder_hashes(out)
    assert len([f for f in hashes if f.endswith(".safetensors")]) >= 4, hashes
    return hashes


def test_nproc_per_node_matches_single_process(reference, tmp_path):
    out = tmp_path / "n3"
    proc = _export(out, "--nproc-per-node", "3")
    assert folder_hashes(out) == reference
    assert "rank 2:" in proc.stderr and "slowest rank" in proc.stderr, proc.stderr[-2000:]
    # the stage timings name the launch's parts
    assert re.search(r"seconds: start-up [0-9.]+, process group [0-9.]+, device", proc.stderr), proc.stderr[-2000:]


def test_killed_rank_ends_job_fast_and_resume_completes(reference, tmp_path):
    """SIGKILL rank 1 at its 2nd item: with the default 20 s heartbeat timeout the job still ends within
    seconds (the peers see the local process vanish); the survivors and the launcher name rank 1; no index;
    --resume with the launcher gives the reference bytes."""
    out = tmp_path / "killed"
    t0 = time.monotonic()
    proc = _export(out, "--nproc-per-node", "2", env={"DIST_EXPORT_FAULT": "kill:1:1"}, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 15, f"took {elapsed:.1f} s (heartbeat timeout is 20 s):\n{proc.stderr[-2000:]}"
    assert re.search(r"\[rank 0\] error: .*rank 1 died", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"\[launcher\] error: rank 1 killed by SIGKILL", proc.stderr), proc.stderr[-2000:]
    assert not os.path.exists(out / "model.safetensors.index.json")
    _export(out, "--nproc-per-node", "2", "--resume")
    assert folder_hashes(out) == reference


def test_launcher_parent_does_not_import_torch():
    code = ("import sys; from dist_export import cli; from dist_export.runtime import launch; cli.build_parser(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
             "SLURM_STEP_NUM_TASKS": "2"}


@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "2"}, SRUN_TASK])
def test_nproc_per_node_under_another_launcher_refused(env, tmp_path):
    proc = _export(tmp_path / "x", "--nproc-per-node", "2", env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("do not combine it with torchrun or srun (they already "
                                                         "set the ranks)"), proc.stderr
    assert not (tmp_path / "x").exists()


def test_strip_option():
    from dist_export.runtime.launch import strip_option

    argv = ["-v", "export", "--nproc-per-node", "2", "--out", "o", "--nproc-per-node=3"]
    assert strip_option(argv, "--nproc-per-node") == ["-v", "export", "--out", "o"]


def test_groups_measured_first_only_when_split_or_reused():
    """Only groups split over ranks, or with a member in a reused shard, are measured before the pipeline."""
    from dist_export.options import parse_size
    from dist_export.groups import groups_to_measure_first, split_groups
    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.output_formats import get_output_format

    tensors = SourceCheckpoint(model_dir(MODEL)).tensors
    fmt, rec = get_output_format("vllm-fq"), load_recipe(RECIPE)
    one = build_plan(tensors, rec, fmt, 1, parse_size(SHARD))
    assert one.groups and not split_groups(one)
    assert groups_to_measure_first(one, 0, {}) == set()
    shard = next(s for s in one.shards if any(one.items[n].group for n in s.items))
    reused = groups_to_measure_first(one, 0, {shard.filename: {}})
    assert reused == {one.items[n].group for n in shard.items if one.items[n].group}
    three = build_plan(tensors, rec, fmt, 3, parse_size(SHARD))
    split = split_groups(three)
    assert split, "test setup: no group spans ranks at world size 3"
    owner = three.owners()
    assert all(len({owner[m] for m in three.groups[g]}) > 1 for g in split)
    assert all(len({owner[m] for m in three.groups[g]}) == 1 for g in set(three.groups) - split)


class _FakeCtx:
    rank, world_size, is_rank0 = 0, 2, True


def _monitor(dead_after=0.5):
    from dist_export.runtime.monitor import Monitor

    m = Monitor(_FakeCtx(), None, dead_after=dead_after, hang_after=60)
    m.failures = []
    m._fail = m.failures.append  # instead of printing and exiting the process
    return m


def _record(beat, state, pid):
    import socket

    return [beat, 0, state, 0, 0, socket.gethostname(), str(pid)]


def test_monitor_names_vanished_local_peer_at_once():
    """A peer on this host whose process is gone is reported on the first check, not after --dead-timeout."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    m = _monitor(dead_after=3600)
    m._check_peer(1, _record(5, 0, proc.pid), now=10.0, start=0.0)
    assert m.failures and "rank 1 died" in m.failures[0] and str(proc.pid) in m.failures[0]


def test_monitor_ignores_finished_peer():
    """A peer that finished its part (and may exit while rank 0 still verifies) is neither dead nor hung, even
    when its beat stops and its process is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    m = _monitor(dead_after=0.5)
    for t in (1.0, 2.0, 30.0):
        m._check_peer(1, _record(7, 2, proc.pid), now=t, start=0.0)
    assert m.failures == []
    m._check_peer(1, _record(7, 0, os.getpid()), now=31.0, start=0.0)  # a working peer with a stale beat...
    m._check_peer(1, _record(7, 0, os.getpid()), now=32.0, start=0.0)
    assert m.failures and "stopped sending heartbeats" in m.failures[0]  # ...is still caught


def test_sigterm_to_launcher_ends_every_rank(tmp_path):
    """A scheduler's SIGTERM to the launcher reaches every rank (one of them hung on purpose): the job ends
    at once, non-zero, and no rank is left running (a leftover would hold the output folder's lock)."""
    import signal

    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "dist_export", "export", "--model", model_dir(MODEL), "--recipe", RECIPE,
           "--max-shard-size", SHARD, "--out", str(out), "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_EXPORT_FAULT": "hang:1:1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / ".dist_export.lock").exists():
        time.sleep(0.2)
    assert (out / ".dist_export.lock").exists(), "the export never started"
    time.sleep(1.0)
    children = _children(proc.pid)
    assert len(children) == 2, children
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert time.monotonic() - t0 < 10
    assert "[launcher] error: rank" in err and "SIGTERM" in err, err[-2000:]
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "a rank outlived the launcher"
    assert not (out / "model.safetensors.index.json").exists()
    # each rank said why it stopped and removed its partial files (the hung one too: its main thread is asleep)
    for rank in (0, 1):
        assert f"[rank {rank}] error: export aborted: terminated by SIGTERM" in err, err[-2000:]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], sorted(p.name for p in out.iterdir())


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_nproc_per_node_below_one_refused(n, tmp_path):
    proc = _export(tmp_path / "x", "--nproc-per-node", n, check=False)
    assert proc.returncode == 1 and "--nproc-per-node must be at least 1" in proc.stderr.strip().splitlines()[-1]


def test_rank_ignoring_sigterm_is_killed_after_grace():
    """After a rank fails, a peer that neither exits nor obeys SIGTERM is killed 5 s after the grace period;
    the job's exit code is the first failure's."""
    from dist_export.runtime.launch import wait_for_ranks

    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    t0 = time.monotonic()
    assert wait_for_ranks([failing, stubborn], grace_s=1.0, poll_s=0.05) == 3
    assert stubborn.returncode == -9 and time.monotonic() - t0 < 30


# --- bounded start-up (issue 13, item 5) ----------------------------------------------------------------------


def _job(out, fault, *extra, env=None) -> subprocess.Popen:
    """`export --nproc-per-node 2` in a session of its own (the test can signal or kill the whole job)."""
    cmd = [sys.executable, "-m", "dist_export", "export", "--model", model_dir(MODEL), "--recipe", RECIPE,
           "--max-shard-size", SHARD, "--out", str(out), "--nproc-per-node", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_EXPORT_FAULT": fault, **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ended(proc: subprocess.Popen, timeout: float) -> str:
    """stderr once every process of the job has ended (the ranks hold stderr open); fails after `timeout`."""
    import signal

    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the job was still running after {timeout} s:\n{err[-2000:]}")
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a rank outlived the job"
    return err


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _rendezvous_reached(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until a rank has opened the launcher's file store (it is inside the rendezvous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _children(proc.pid):
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            store = env.get(b"DIST_EXPORT_RENDEZVOUS", b"").decode().removeprefix("file://")
            if store and os.path.exists(store):
                return
        time.sleep(0.1)
    pytest.fail("no rank reached the rendezvous")


@pytest.mark.parametrize("fault,dead_timeout,named", [
    ("stop:1:start", 3, r"rank 1 did not reach the rendezvous within 3 s \(--dead-timeout\)"),
    ("stop:1:join", 3, r"rank 1 is stopped \(process \d+ on \S+: SIGSTOP"),
    ("kill:1:join", 120, r"rank 1 died during start-up \(process \d+ on \S+ is gone\)"),
])
def test_rank_stopped_or_killed_at_start_up_is_named_in_time(tmp_path, fault, dead_timeout, named):
    """A rank stopped (SIGSTOP) or killed before or while the process group forms: rank 0 names it in one line
    within --dead-timeout (a killed one at once, well before a 120 s deadline) instead of waiting out the
    group's 3600 s timeout; the launcher kills the stopped rank; nothing is written, no rank is left."""
    src = model_dir(MODEL)
    before = folder_hashes(src)
    out = tmp_path / "out"
    t0 = time.monotonic()
    err = _ended(_job(out, fault, "--dead-timeout", str(dead_timeout)), timeout=90)
    elapsed = time.monotonic() - t0
    lines = [ln for ln in err.splitlines() if ln.startswith("[rank 0] error:")]
    assert len(lines) == 1 and re.search(r"^\[rank 0\] error: start-up aborted: " + named + r".*; nothing was "
                                         r"written: rerun the command$", lines[0]), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert elapsed < 40, f"took {elapsed:.1f} s:\n{err[-2000:]}"
    if fault.startswith("stop"):
        assert "[launcher] rank 1 is stopped (SIGSTOP) after rank 0 failed: killing it" in err, err[-2000:]
    assert not out.exists() and folder_hashes(src) == before


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while rank 0 waits inside the rendezvous for a rank that
    hangs before it: one line, exit 130, no traceback and no launcher error, every rank gone at once."""
    import signal

    out = tmp_path / "out"
    proc = _job(out, "hang:1:start", "--dead-timeout", "120")
    _rendezvous_reached(proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    err = _ended(proc, timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == ["[rank 0] interrupted during start-up (the process group was forming); "
                                        "nothing was written"], err[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("fault", ["hang:1:start", "hang:1:1"])
def test_sigkill_of_the_launcher_takes_its_ranks(tmp_path, fault):
    """SIGKILL of the `--nproc-per-node` parent (nothing can be forwarded) during start-up or mid-export: the
    kernel's parent-death signal (SIGTERM) ends every rank within seconds, each says why in one line and
    removes its temporaries; nothing is published."""
    import signal

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    decoy = tmp / "dist-export-rdzv-other-job"  # another job's rendezvous folder: never ours to remove
    decoy.mkdir()
    (decoy / "store").write_bytes(b"x")
    proc = _job(out, fault, "--dead-timeout", "120", "--hang-timeout", "120", env={"TMPDIR": str(tmp)})
    if fault.endswith(":start"):
        _rendezvous_reached(proc)
    else:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / ".dist_export.lock").exists():
            time.sleep(0.2)
        assert (out / ".dist_export.lock").exists(), "the export never started"
    time.sleep(1.0)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    err = _ended(proc, timeout=30)
    assert time.monotonic() - t0 < 10, err[-2000:]
    what = "start-up aborted" if fault.endswith(":start") else "export aborted"
    for rank in (0, 1):
        assert f"[rank {rank}] error: {what}: terminated by SIGTERM: the launcher (pid {proc.pid}) is gone" in err, \
            err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    found = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [f for f in found if f.endswith(".tmp")] and "model.safetensors.index.json" not in found, found
    # the dead launcher's rendezvous folder is removed by its ranks; the other job's is untouched
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("dist-export-rdzv-")) == [decoy.name]
    assert (decoy / "store").read_bytes() == b"x"


def _catches_sigterm(pid: int) -> bool:
    """The process has a SIGTERM handler (bit 15 of SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    import signal

    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def _wait_for_ranks(proc: subprocess.Popen, ready, timeout: float, poll_s: float) -> list[int]:
    """The job's two children once `ready` holds for both (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    ranks: list[int] = []
    while time.monotonic() < deadline and not (len(ranks) == 2 and all(map(ready, ranks))):
        ranks = _children(proc.pid) if proc.poll() is None else []
        time.sleep(poll_s)
    assert len(ranks) == 2 and all(map(ready, ranks)), ranks
    return ranks


def test_sigkill_of_the_launcher_while_ranks_load_torch(tmp_path):
    """SIGKILL of the `--nproc-per-node` parent while its ranks still import torch (they asked for the
    parent-death signal, the start-up guard has no handler yet): each rank says why in one line, exits 143 and
    removes the rendezvous folder. They used to die silently of the default SIGTERM action (CI, stop 24)."""
    import signal

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    proc = _job(out, "", "--dead-timeout", "120", env={"TMPDIR": str(tmp)})
    try:
        ranks = _wait_for_ranks(proc, _catches_sigterm, timeout=60, poll_s=0.005)
        loading = [not _loaded_torch(r) for r in ranks]
        os.kill(proc.pid, signal.SIGKILL)
        err = _ended(proc, timeout=30)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert any(loading), "no rank had a SIGTERM handler before torch was loaded"
    for rank in (0, 1):
        assert f"[rank {rank}] error: start-up aborted: terminated by SIGTERM: the launcher (pid {proc.pid}) " \
               f"is gone; nothing was written: rerun the command" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not out.exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("dist-export-rdzv-")]


def _loaded_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


def test_sigkill_of_torchrun_takes_its_workers(tmp_path):
    """SIGKILL of torchrun while rank 1 stalls before the rendezvous (rank 0 waits in it, --dead-timeout 120):
    the workers asked for SIGTERM on their parent's death (TORCHELASTIC_* set), so every worker is gone within
    seconds, each with one line, and nothing is written. They used to run on until the start-up deadline."""
    import signal

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "dist_export", "export", "--model", model_dir(MODEL), "--recipe", RECIPE, "--max-shard-size", SHARD,
           "--out", str(out), "--dead-timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_EXPORT_FAULT": "hang:1:start"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        workers = _wait_for_ranks(proc, _loaded_torch, timeout=90, poll_s=0.2)
        time.sleep(2.0)  # rank 0 reaches the rendezvous, rank 1 stalls before it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while [w for w in workers if _alive(w)] and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "a worker outlived torchrun"
        err = proc.stderr.read()
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] error: start-up aborted: terminated by SIGTERM: the launcher \(pid "
                         rf"{proc.pid}\) is gone; nothing was written", err), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not out.exists()


def _alive(pid: int) -> bool:
    from dist_export.runtime.processes import process_state

    return process_state(pid) is not None


@pytest.mark.parametrize("killed", [1, 0])
def test_rank_killed_at_the_commit_says_no_index_and_writes_none(tmp_path, capsys, killed):
    """A rank SIGKILLed as it enters the commit step (rank 1 while rank 0 stages and verifies the export; rank 0
    itself): the survivor's one line says no index was written, and none was: the index comes only after every
    rank knows the commit's outcome. The job exits non-zero with nothing published, the source is unchanged,
    and --resume finishes with every shard reused. A survivor used to say 'no index was written' although the
    index had been written before the verify (issue 13)."""
    from helpers import cli_in_process

    src = model_dir(MODEL)
    before = folder_hashes(src)
    out = tmp_path / "out"
    proc = _job(out, f"kill:{killed}:commit", "--dead-timeout", "60")
    err = _ended(proc, timeout=120)
    survivor = 1 - killed
    assert proc.returncode == 137, (proc.returncode, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith(f"[rank {survivor}] error:")]
    assert len(lines) == 1 and re.fullmatch(rf"\[rank {survivor}\] error: export aborted: rank {killed} died "
                                            rf"\(process \d+ on \S+ is gone\); no index was written, rerun with "
                                            rf"--resume", lines[0]), err[-2000:]
    assert f"[launcher] error: rank {killed} killed by SIGKILL" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    found = sorted(os.listdir(out))
    assert "model.safetensors.index.json" not in found and "model.safetensors" not in found, found
    assert not [f for f in found if f.endswith((".tmp", ".staged"))], found
    assert folder_hashes(src) == before
    rc, _, err = cli_in_process(capsys, "export", "--model", src, "--recipe", RECIPE, "--max-shard-size", SHARD,
                                "--out", str(out), "--resume")
    assert rc == 0 and "model.safetensors.index.json" in os.listdir(out), err[-2000:]
    assert "writing it again" not in err and err.count("resume: reusing") > 0, err[-2000:]


BATCH_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # sbatch script
SALLOC_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "1"}


@pytest.mark.parametrize("env,layout", [(BATCH_STEP, None), (SALLOC_SHELL, None), ({"RANK": "1", "WORLD_SIZE": "2"}, 2),
                                        (SRUN_TASK, 2)])
def test_slurm_layout_only_from_an_srun_task(monkeypatch, env, layout):
    from dist_export.runtime.dist import launcher_env

    for k in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = launcher_env()
    assert (got and got["world_size"]) == layout, got


def test_slurm_variables_without_srun_export_as_one_process(reference, tmp_path):
    """An sbatch script with --ntasks=2 that runs dist-export without srun (SLURM_PROCID=0, no step): one process
    with a note naming the fix, the reference bytes; it used to wait for a second rank for 3600 s."""
    out = tmp_path / "batch"
    proc = _export(out, env=BATCH_STEP)  # run_cli's 240 s timeout fails the test on a hang
    assert "SLURM_NTASKS=2 is set but this process was not started by srun" in proc.stderr, proc.stderr[-2000:]
    assert "`srun dist-export ...` or add --nproc-per-node N" in proc.stderr
    assert folder_hashes(out) == reference


@pytest.mark.parametrize("env", [SALLOC_SHELL, BATCH_STEP])
def test_nproc_per_node_in_an_allocation_without_srun(reference, tmp_path, env):
    """`--nproc-per-node 2` in an salloc shell or a batch script (SLURM_NTASKS=2, no srun) starts its ranks: it
    was refused as if srun had started them."""
    out = tmp_path / "n2"
    _export(out, "--nproc-per-node", "2", env=env)
    assert folder_hashes(out) == reference


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 1.0, 1.5])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path, delay):
    """Ctrl-C `delay` s after `export --nproc-per-node 2` starts (interpreters starting, torch loading, or the
    rendezvous): exit 130, one line, no traceback. A KeyboardInterrupt raised inside an import used to end in a
    traceback (or numpy's 'cannot load module more than once' and exit 1), and a rank whose interpreter had no
    handler yet was killed by the SIGINT itself."""
    import signal

    out = tmp_path / "out"
    proc = _job(out, "", "--dead-timeout", "120")
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    err = _ended(proc, timeout=30)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], (proc.returncode, err[-3000:])
    assert "Traceback" not in err
    found = os.listdir(out) if out.exists() else []
    assert not [f for f in found if f.endswith(".tmp")] and "model.safetensors.index.json" not in found, found


def test_a_handled_signal_is_absorbed_by_a_python_handler_never_sig_ign():
    """Every one-shot handler (loading-time Ctrl-C and SIGTERM, the command's first Ctrl-C, the monitor after an
    interrupt) leaves a Python no-op behind, not SIG_IGN: CPython prints 'OSError: Signal 2 ignored due to race
    condition' with a traceback when the repeat (the launcher's forwarded Ctrl-C, microseconds after the
    terminal's) lands while the disposition becomes SIG_IGN; CI of stop 25 failed on that traceback. Then a
    pending repeat is swallowed without a word."""
    code = r"""
import signal, sys, threading
from dist_export import cli
from dist_export.runtime import monitor

def disposition():
    h = signal.getsignal(signal.SIGINT)
    return "SIG_IGN" if h is signal.SIG_IGN else getattr(h, "__name__", repr(h))

cli._interrupt_once()
try:
    signal.raise_signal(signal.SIGINT)
    print("no KeyboardInterrupt")
except KeyboardInterrupt:
    print("first:", disposition())
signal.raise_signal(signal.SIGINT)  # a repeat: absorbed
signal.raise_signal(signal.SIGINT)
print("repeats absorbed:", disposition())

m = monitor.Monitor.__new__(monitor.Monitor)
m.interrupted, m._old_sigint, m._wakeup = True, signal.default_int_handler, None
m._stop, m._thread, m.progress = threading.Event(), threading.Thread(target=lambda: None), type("P", (), {"close": lambda self: None})()
m.stop()
print("monitor:", disposition())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == ["first: _absorb", "repeats absorbed: _absorb", "monitor: _absorb"], proc.stdout
