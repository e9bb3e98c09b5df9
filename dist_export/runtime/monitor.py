"""Per-rank background monitor (every rank, all stages): heartbeats and hang/death detection; on rank 0 it feeds
the job-wide sums to the progress bar (`progress.py`).

Every `interval` seconds each rank publishes `hb/<rank>` = "<beat> <steps> <state> <items> <bytes> <host> <pid>"
(state 0 working, 1 waiting on peers, 2 finished, 3 interrupted) in the process group's key-value store and
reads its peers':
  * a peer on this host whose process is gone is dead at once (a killed local rank is named within a second);
  * a peer whose beat has not changed for `dead_after` s is dead (killed on another node, node lost);
  * a peer whose step counter has not changed for `hang_after` s while it is not waiting on others is hung.
Either way this rank prints one line naming the peer and exits non-zero (after removing its own temporary
files), so every rank ends within a bounded time and none waits forever inside a collective. Timestamps are
local (`time.monotonic`): no clock agreement between nodes is needed.

The counters come from the export's `Progress` (handed to the monitor and to the stages that advance it);
rank 0 sums every rank's heartbeat and hands the totals to `Progress.show`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

from .processes import SignalWakeup, process_state
from .progress import Progress
from .signals import ignore_from_now_on

WORKING, WAITING, FINISHED, INTERRUPTED = 0, 1, 2, 3
INTERRUPT_GRACE = 3.0  # s a peer may be interrupted before this rank, that was not, aborts too


class Monitor:
    def __init__(self, ctx, store, interval: float = 1.0, dead_after: float = 20.0, hang_after: float = 45.0,
                 on_fail=None, progress: Progress | None = None, job: str = "export",
                 left: str = "no index was written, rerun with --resume"):
        self.ctx, self.store = ctx, store
        self.job, self.left = job, left  # the abort line: "<job> aborted: <why>; <left>"
        self.interval, self.dead_after, self.hang_after = interval, dead_after, hang_after
        self.on_fail = on_fail
        self.progress = Progress() if progress is None else progress
        self._waits = 0  # finished waits on peers: progress too (a slow peer is not this rank hanging)
        self._waiting = 0
        self._beat = 0
        self.interrupted = False
        self._old_sigint = None
        self._wakeup: SignalWakeup | None = None
        self._terminating = threading.Lock()
        self._peer_interrupted: dict[int, float] = {}
        self._stop = threading.Event()
        self._seen: dict[int, tuple[tuple[int, int], float, float]] = {}
        self._thread = threading.Thread(target=self._run, name=f"monitor-rank{ctx.rank}", daemon=True)

    # -- called by the main thread ---------------------------------------------------------------
    def start(self) -> "Monitor":
        self._publish()
        if threading.current_thread() is threading.main_thread():
            self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            if self.store is not None:
                self._catch_sigterm()
        self._thread.start()
        return self

    def _catch_sigterm(self) -> None:
        """A launcher (torchrun, srun, ours) stops the other ranks with SIGTERM when one fails: this rank then
        names the dead peer, removes its temporary files and exits, instead of dying silently. The signal also
        wakes the monitor thread (`SignalWakeup`), so it is handled while the main thread is blocked inside a C
        call (a collective) where a Python handler would not run."""
        self._wakeup = SignalWakeup.open({signal.SIGTERM: lambda signum, frame: self._terminated()})

    def _terminated(self) -> None:
        if not self._terminating.acquire(blocking=False):
            return  # the other thread is already exiting
        from .launch import SETTLE_S, launcher_gone, remove_launcher_rendezvous

        gone = launcher_gone(settle_s=SETTLE_S)  # SIGKILL of our launcher or torchrun: the kernel's parent-death signal
        dead = "" if gone else "; ".join(self.dead_peers())  # with the launcher gone, its store may be too
        why = f": {gone}" if gone else " (a launcher stops every rank once one fails)"
        self._fail("terminated by SIGTERM" + why + (f"; {dead}" if dead else ""), code=128 + signal.SIGTERM,
                   clean=remove_launcher_rendezvous if gone else None)

    def _on_sigint(self, signum, frame) -> None:
        """The first Ctrl-C: tell the peers, stop watching them, unwind the main thread; ignore any later one."""
        if self.interrupted:
            return
        self.interrupted = True
        self._stop.set()
        with contextlib.suppress(Exception):
            self._publish(INTERRUPTED)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting(self):
        """Blocked on peers (a collective), or inside one long library call that cannot report progress (a
        model load): the peers do not count this rank as hung meanwhile; a dead process is still seen."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            self._waits += 1

    def stop(self) -> None:
        self._stop.set()
        if self._wakeup is not None:  # wake the thread from its select now, not after up to `interval` s (a
            self._wakeup.poke()  # launcher's SIGTERM may end this rank before it prints its line)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.progress.close()
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            self._wakeup.close()
            self._wakeup = None
        if self._old_sigint is not None:
            # after an interrupt, later SIGINTs (the launcher forwards the terminal's) stay ignored until exit
            if self.interrupted:
                ignore_from_now_on(signal.SIGINT)
            else:
                signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None

    def finish(self) -> None:
        """The job's outcome is known to every rank (it succeeded, or a step failed and every rank got the
        error): stop, and tell peers to stop watching this rank, which may now exit before them."""
        self.stop()
        with contextlib.suppress(Exception):
            self._publish(FINISHED)

    # -- background thread ------------------------------------------------------------------------
    def _steps(self) -> int:
        """The hang detector's counter: changes whenever this rank's work or a wait on peers moves on."""
        return self.progress.steps + self._waits

    def _publish(self, state: int | None = None) -> None:
        self._beat += 1
        if self.store is None:
            return
        state = (WAITING if self._waiting > 0 else WORKING) if state is None else state
        record = (f"{self._beat} {self._steps()} {state} {self.progress.items} {self.progress.bytes} "
                  f"{socket.gethostname()} {os.getpid()}")
        self.store.set(f"hb/{self.ctx.rank}", record)

    def _wait_interval(self) -> bool:
        """Sleep one interval (woken early by a SIGTERM, which ends this rank); True once stopped."""
        wakeup = self._wakeup
        if wakeup is None:
            return self._stop.wait(self.interval)
        if signal.SIGTERM in wakeup.wait(self.interval) and not self._stop.is_set():
            self._terminated()
        return self._stop.is_set()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._wait_interval():
            try:
                self._publish()
                records = self._read_peers()
            except Exception as e:  # noqa: BLE001 - the store lives on a peer: losing it means a peer died
                if self._stop.is_set():
                    return
                if _launcher_gone():  # the cause (and a peer may have removed its rendezvous folder already)
                    self._terminated()
                    return
                self._fail(f"lost contact with the job's key-value store ({type(e).__name__}: {e}); a peer has died")
                return
            now = time.monotonic()
            for peer, rec in records.items():
                if peer == self.ctx.rank:
                    continue
                self._check_peer(peer, rec, now, start)
            if self.ctx.is_rank0:
                self.progress.show(*self._totals(records))

    def _read_peers(self) -> dict[int, list[int] | None]:
        if self.store is None:
            return {0: [self._beat, self._steps(), 0, self.progress.items, self.progress.bytes]}
        out = {}
        for r in range(self.ctx.world_size):
            key = f"hb/{r}"
            out[r] = _parse(self.store.get(key).decode()) if self.store.check([key]) else None
        return out

    def dead_peers(self) -> list[str]:
        """Peers on this host whose process is gone (or a zombie): named right after a collective breaks,
        before any heartbeat has had time to go stale."""
        if self.store is None:
            return []
        dead = []
        try:
            records = self._read_peers()
        except Exception:  # noqa: BLE001 - the store itself may have died with rank 0
            return []
        for r, rec in sorted(records.items()):
            if r != self.ctx.rank and rec and _local_process_gone(rec):
                dead.append(f"rank {r} died (process {rec[6]} on {rec[5]} is gone)")
        return dead

    def _check_peer(self, peer: int, rec, now: float, start: float) -> None:
        if rec is None:
            if now - start > self.dead_after:
                self._fail(f"rank {peer} never reported (not started or died at start-up)")
            return
        beat, progress, state = rec[0], rec[1], rec[2]
        if state == FINISHED:
            return
        if state == INTERRUPTED:
            first = self._peer_interrupted.setdefault(peer, now)
            if now - first > INTERRUPT_GRACE:
                self._fail(f"rank {peer} was interrupted (Ctrl-C)")
            return
        if _local_process_gone(rec):
            self._fail(f"rank {peer} died (process {rec[6]} on {rec[5]} is gone)")
            return
        waiting = state == WAITING
        prev = self._seen.get(peer)
        if prev is None:
            self._seen[peer] = ((beat, progress), now, now)
            return
        (pbeat, pprog), beat_t, prog_t = prev
        beat_t = now if beat != pbeat else beat_t
        prog_t = now if (progress != pprog or waiting) else prog_t
        self._seen[peer] = ((beat, progress), beat_t, prog_t)
        if now - beat_t > self.dead_after:
            self._fail(f"rank {peer} stopped sending heartbeats for {now - beat_t:.0f} s (killed or its node was lost)")
        elif now - prog_t > self.hang_after:
            self._fail(f"rank {peer} made no progress for {now - prog_t:.0f} s (hung)")

    def _fail(self, message: str, code: int = 1, clean=None) -> None:
        line = f"[rank {self.ctx.rank}] error: {self.job} aborted: {message}; {self.left}"
        print(line, file=sys.stderr, flush=True)
        for fn in (self.on_fail, clean):
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
        os._exit(code)  # the main thread may be blocked in a collective that will never return

    def _totals(self, records) -> tuple[int, int]:
        """(bytes, items) done by the whole job: the sum of every rank's last heartbeat."""
        if records:
            return (sum(r[4] for r in records.values() if r), sum(r[3] for r in records.values() if r))
        return self.progress.bytes, self.progress.items


def _parse(record: str) -> list:
    parts = record.split()
    return [int(x) for x in parts[:5]] + parts[5:]


def _local_process_gone(rec) -> bool:
    """The peer runs on this host (its record names it) and its process no longer exists (or is a zombie)."""
    return len(rec) >= 7 and rec[5] == socket.gethostname() and not _alive(int(rec[6]))


def _launcher_gone() -> bool:
    from .launch import launcher_gone

    return launcher_gone() is not None


def _alive(pid: int) -> bool:
    return process_state(pid) is not None


def start_monitor(ctx, **kwargs) -> Monitor:
    """Start the monitor (a single process only feeds the progress bar: it has no peers to watch)."""
    store = None
    if ctx.is_distributed:
        import torch.distributed as dist

        store = dist.PrefixStore("dist_export/", dist.distributed_c10d._get_default_store())
    ctx.monitor = Monitor(ctx, store, **kwargs).start()
    return ctx.monitor
