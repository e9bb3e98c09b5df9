"""`dist-export export --nproc-per-node N`: start N ranks on this machine without torchrun.

Why a launcher of our own: torchrun's agent imports torch and runs a rendezvous before it starts the workers,
which costs seconds that do not shrink with more GPUs. This parent imports neither torch nor transformers: it
starts N `python -m dist_export` children at once, each with the same environment torchrun would give it
(RANK, LOCAL_RANK, WORLD_SIZE, ...), and the children meet through a file store in a private temporary folder
(no port to pick, so two jobs on one machine never collide). Tensor data never passes through the parent.

Failure: a rank's peers notice a dead process on their host within about a second (see `monitor.py`) and exit
with one line naming it; the parent then reports every rank's exit and returns the first failure's code. A
rank that has not exited `grace_s` seconds after the first failure is terminated. SIGINT/SIGTERM sent to the
parent are passed on to every rank; after Ctrl-C that every rank obeyed (exit 130) the parent adds no line of its
own: rank 0's says what is left and how to resume.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

RENDEZVOUS_ENV = "DIST_EXPORT_RENDEZVOUS"  # init_method for the children, e.g. file:///tmp/x/store


def strip_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE` (the children must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def rank_env(rank: int, nproc: int, rendezvous: str) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", RENDEZVOUS_ENV: rendezvous}


def describe_exit(code: int) -> str:
    if code == 128 + signal.SIGTERM:
        return f"exited with code {code} (stopped by SIGTERM)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def launch_local(argv: list[str], nproc: int, grace_s: float = 30.0, poll_s: float = 0.05) -> int:
    """Run `python -m dist_export ARGV` as ranks 0..nproc-1 on this machine; return the job's exit code."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise ValueError("--nproc-per-node starts its own ranks; do not combine it with torchrun or srun "
                         "(they already set the ranks)")
    tmp = tempfile.mkdtemp(prefix="dist-export-rdzv-")
    rendezvous = "file://" + os.path.join(tmp, "store")
    procs: list[subprocess.Popen] = []
    forwarded = {}
    interrupted: list[int] = []

    def forward(signum, _frame):
        interrupted.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        forwarded[sig] = signal.signal(sig, forward)
    try:
        for rank in range(nproc):
            env = {**os.environ, **rank_env(rank, nproc, rendezvous)}
            procs.append(subprocess.Popen([sys.executable, "-m", "dist_export", *argv], env=env))
        return _wait(procs, grace_s, poll_s, interrupted)
    finally:
        for p in procs:  # never leave a rank behind, whatever happened to the parent
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmp, ignore_errors=True)


def _first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(rank, code) of the failure behind the others: a rank killed by a signal is the cause, an error exit may
    be a peer's reaction to it."""
    failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda rc: (rc[1] > 0, rc[0])) if failed else None


def _wait(procs: list[subprocess.Popen], grace_s: float, poll_s: float, interrupted=()) -> int:
    first, deadline, stops = None, None, (signal.SIGTERM, signal.SIGKILL)
    while [p.poll() for p in procs].count(None):  # poll every rank each round (no short-circuit)
        if first is None:
            first = _first_failure([p.returncode for p in procs])
            deadline = time.monotonic() + grace_s if first else None
        elif time.monotonic() > deadline and stops:
            sig, stops = stops[0], stops[1:]  # SIGTERM after the grace period, SIGKILL 5 s later
            for r, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launcher] rank {r} still running after rank {first[0]} failed: sending "
                          f"{sig.name}", file=sys.stderr, flush=True)
                    p.send_signal(sig)
            deadline = time.monotonic() + 5.0
        time.sleep(poll_s)
    codes = [p.returncode for p in procs]
    first = first or _first_failure(codes)
    if first is None:
        return 0
    rank, code = first
    if signal.SIGINT in interrupted and all(c in (0, 130, -signal.SIGINT) for c in codes):
        return 130  # Ctrl-C: rank 0 has said what is left and how to go on; nothing failed
    others = ", ".join(f"rank {r} {describe_exit(c)}" for r, c in enumerate(codes) if r != rank and c != 0)
    print(f"[launcher] error: rank {rank} {describe_exit(code)}" + (f" (then {others})" if others else ""),
          file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code
