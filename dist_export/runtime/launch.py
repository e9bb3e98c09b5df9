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
own: rank 0's says what is left and how to resume. A rank that is stopped (SIGSTOP, state T) when another has
failed cannot say anything: it is killed at once instead of after the grace period.

Ranks start with SIGINT blocked (inherited through exec) until their __main__ has a handler, and after a Ctrl-C
the parent sends SIGINT again every second while a rank is left (later ones are ignored), so a Ctrl-C at any
moment of start-up is one line, not a rank killed half-way or a traceback from inside an import.
A SIGKILL of the parent cannot be forwarded: each rank asks the kernel for SIGTERM when its parent dies
(`die_with_launcher`, prctl PR_SET_PDEATHSIG on Linux), and its SIGTERM handling removes its temporaries and the
dead launcher's rendezvous folder (`remove_launcher_rendezvous`: only that exact folder, never through a link).
Ranks started by torchrun (TORCHELASTIC_* variables) ask for the same signal, their parent being torchrun's agent.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .signals import ignore_from_now_on

RENDEZVOUS_ENV = "DIST_EXPORT_RENDEZVOUS"  # init_method for the children, e.g. file:///tmp/x/store
LAUNCHER_PID_ENV = "DIST_EXPORT_LAUNCHER_PID"  # the parent's pid, read (and removed) by die_with_launcher
PR_SET_PDEATHSIG = 1
SETTLE_S = 0.5  # how long a rank that got SIGTERM looks for its launcher's death (`launcher_gone`)
RENDEZVOUS_PREFIX = "dist-export-rdzv-"  # launch_local's private folder in the temporary folder
_launcher_pid: int | None = None  # this rank's launcher, once die_with_launcher ran
_rendezvous_dir: str | None = None  # that launcher's rendezvous folder (ours only, not torchrun's)


def srun_task(env=os.environ) -> bool:
    """This process is one task of an srun step of several tasks (srun sets SLURM_STEP_NUM_TASKS; a batch script
    or an salloc shell has SLURM_NTASKS and maybe SLURM_PROCID, but no step and no peers)."""
    return "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS") or "1") > 1


def die_with_launcher() -> None:
    """In a rank started by `launch_local` or torchrun: have the kernel send SIGTERM when the launcher dies (even
    by SIGKILL), so no rank goes on without it. Race-free: the parent is recorded before the request and checked
    after it, so a launcher gone in between is one line and exit 143 (its rendezvous folder removed)."""
    global _launcher_pid, _rendezvous_dir
    pid = os.environ.pop(LAUNCHER_PID_ENV, None)
    torchrun = any(k.startswith("TORCHELASTIC_") for k in os.environ)
    if not (pid or torchrun) or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()  # before the request: a parent that dies after it is signalled, one before is seen below
    _launcher_pid = int(pid) if pid else parent
    if pid:
        _rendezvous_dir = os.path.dirname(os.environ.get(RENDEZVOUS_ENV, "").removeprefix("file://")) or None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated_while_loading)  # until cli.main has loaded the command's modules
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != _launcher_pid:
        print(f"[rank {os.environ.get('RANK', '?')}] error: {launcher_gone()}; this rank stops too",
              file=sys.stderr, flush=True)
        remove_launcher_rendezvous()
        os._exit(128 + signal.SIGTERM)


def start_up_aborted_line(rank, message: str) -> str:
    """The one line of a rank that stops before the process group formed (this module and the start-up guard)."""
    return f"[rank {rank}] error: start-up aborted: {message}; nothing was written: rerun the command"


def _terminated_while_loading(signum, frame) -> None:
    """SIGTERM while the command's modules load (torch: seconds, before the start-up guard has a handler): one
    line and exit 143, not a silent death; the launcher's rendezvous folder removed when the launcher is gone."""
    ignore_from_now_on(signal.SIGTERM)
    gone = launcher_gone(settle_s=SETTLE_S)
    why = f": {gone}" if gone else " (a launcher stopping the job)"
    os.write(2, (start_up_aborted_line(os.environ.get("RANK", "?"), f"terminated by SIGTERM{why}") + "\n").encode())
    if gone:
        remove_launcher_rendezvous()
    os._exit(128 + signal.SIGTERM)


_terminated_while_loading.loading = True  # cli.main restores the default once the modules are loaded


def remove_launcher_rendezvous() -> None:
    """Once this rank's launcher is gone (a SIGKILL: its own clean-up never ran), remove its rendezvous folder: only
    when it is exactly `<tmp>/dist-export-rdzv-*` of this rank's temporary folder, a real folder (not a link) that
    this user owns; a peer removing it first is fine."""
    import shutil
    import stat
    import tempfile

    folder = _rendezvous_dir
    if folder is None or launcher_gone() is None:
        return
    name = os.path.basename(folder)
    if not name.startswith(RENDEZVOUS_PREFIX) or os.path.dirname(folder) != tempfile.gettempdir():
        return
    try:
        st = os.lstat(folder)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(folder, ignore_errors=True)  # never follows a link inside (fd-based on Linux)


def launcher_gone(settle_s: float = 0.0) -> str | None:
    """'the launcher (pid N) is gone' when this rank's launcher has died (its parent changed), else None. On a
    SIGTERM, `settle_s`: the kernel reparents a process thread by thread and signals it after the first, so a
    thread other than that one may still see the dead parent for a moment; look again until then."""
    if _launcher_pid is None:
        return None
    deadline = time.monotonic() + settle_s
    while os.getppid() == _launcher_pid:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
    return f"the launcher (pid {_launcher_pid}) is gone"


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
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", RENDEZVOUS_ENV: rendezvous,
            LAUNCHER_PID_ENV: str(os.getpid())}


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
    if "RANK" in os.environ or srun_task():
        raise ValueError("--nproc-per-node starts its own ranks; do not combine it with torchrun or srun "
                         "(they already set the ranks)")
    tmp = tempfile.mkdtemp(prefix=RENDEZVOUS_PREFIX)
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
            procs.append(_start_rank(argv, env))
        return wait_for_ranks(procs, grace_s, poll_s, interrupted)
    finally:
        for p in procs:  # never leave a rank behind, whatever happened to the parent
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmp, ignore_errors=True)


def _start_rank(argv: list[str], env: dict) -> subprocess.Popen:
    """One rank, started with SIGINT blocked (the mask is inherited through fork and exec): a Ctrl-C while its
    interpreter starts would kill it before any handler exists; its __main__ installs one, then unblocks, and a
    held SIGINT arrives. Here it is held too, and delivered to `forward` when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen([sys.executable, "-m", "dist_export", *argv], env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(rank, code) of the failure behind the others: a rank killed by a signal is the cause, an error exit may
    be a peer's reaction to it."""
    failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda rc: (rc[1] > 0, rc[0])) if failed else None


def _kill_stopped(procs: list[subprocess.Popen], failed: int) -> None:
    """After a failure, a stopped rank (SIGSTOP, Ctrl-Z) can neither report nor obey SIGTERM: kill it now."""
    from .processes import process_state

    for r, p in enumerate(procs):
        if p.poll() is None and process_state(p.pid) in ("T", "t"):
            print(f"[launcher] rank {r} is stopped (SIGSTOP) after rank {failed} failed: killing it",
                  file=sys.stderr, flush=True)
            p.kill()
            p.wait()


def wait_for_ranks(procs: list[subprocess.Popen], grace_s: float, poll_s: float, interrupted=()) -> int:
    first, deadline, stops = None, None, (signal.SIGTERM, signal.SIGKILL)
    resent = time.monotonic()
    while [p.poll() for p in procs].count(None):  # poll every rank each round (no short-circuit)
        if signal.SIGINT in interrupted and time.monotonic() - resent > 1.0:  # again, for any rank that
            resent = time.monotonic()                                          # missed it: later ones are ignored
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
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
        if first is not None:
            _kill_stopped(procs, first[0])
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
