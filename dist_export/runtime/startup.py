"""Bounded start-up, every rank of a multi-rank launch, before the first stage: the rendezvous and the forming of
the process group run under a deadline (`--dead-timeout`, counted from this rank's own arrival), so a peer that
died, was stopped or never started is named within it instead of after the group's 3600 s timeout.

Each rank checks in to the rendezvous store (`dist_export_startup/<attempt>/<rank>` = "<host> <pid>") before the
group forms. While the main thread waits inside the C++ rendezvous (where no Python signal handler runs), a watcher
thread
  * names at once a peer that checked in on this host and whose process is gone;
  * at the deadline names the peers that never checked in, or those that did and are stopped (state T);
  * handles Ctrl-C (one line on rank 0, exit 130) and SIGTERM (a launcher stopping the job, or the kernel's
    parent-death signal: one line, exit 143) through a signal wakeup pipe.
It ends the process with `os._exit`: the main thread may never return from the C call. Nothing is written before
the group forms, so there is nothing to clean up. After the group forms the monitor (`monitor.py`) takes over,
and its first-heartbeat check ("never reported") is bounded by the same timeout.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time

from .launch import SETTLE_S, launcher_gone, remove_launcher_rendezvous, start_up_aborted_line
from .processes import SignalWakeup, process_state

KEY = "dist_export_startup"


class StartupWatch:
    def __init__(self, rank: int, world_size: int, deadline_s: float, rendezvous: str):
        self.rank, self.world_size, self.deadline_s, self.rendezvous = rank, world_size, deadline_s, rendezvous
        self.attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        self.joined_peers: dict[int, tuple[str, int]] = {}
        self.store = None
        self._done = threading.Event()
        self._failing = threading.Lock()
        self._wakeup: SignalWakeup | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "StartupWatch":
        self._start = time.monotonic()
        self._catch_signals()
        self._spawn(self._watch)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=1.0)
        if self._wakeup is not None:
            self._handle_signals(0)  # one that came in just now
            self._wakeup.close()

    def joined(self, store) -> None:
        """This rank reached the rendezvous: check in, and watch the peers' check-ins from now on."""
        store.set(self._key(self.rank), f"{socket.gethostname()} {os.getpid()}")
        self.store = _second_client(store)
        self._spawn(self._check_peers)

    # -- threads ------------------------------------------------------------------------------------------
    def _spawn(self, fn) -> None:
        t = threading.Thread(target=fn, name=f"startup-rank{self.rank}", daemon=True)
        self._threads.append(t)
        t.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            left = self._start + self.deadline_s - time.monotonic()
            if left <= 0:
                self._fail(self._deadline_message())
                return
            self._handle_signals(min(left, 0.25))

    def _check_peers(self) -> None:
        me = socket.gethostname()
        while not self._done.wait(0.2):
            try:
                self._read_check_ins()
            except Exception as e:  # noqa: BLE001 - the store's host (rank 0 or the launcher) is gone
                if launcher_gone():  # its death is the cause (a peer may have removed its rendezvous folder)
                    self._launcher_died()
                    return
                self._fail(f"lost contact with the rendezvous store ({type(e).__name__}: {str(e)[:120]}); "
                           f"the rank or launcher that hosts it has died")
                return
            for peer, (host, pid) in sorted(self.joined_peers.items()):
                if host == me and process_state(pid) is None:
                    self._fail(f"rank {peer} died during start-up (process {pid} on {host} is gone)")
                    return

    def _read_check_ins(self) -> None:
        for peer in range(self.world_size):
            if peer != self.rank and peer not in self.joined_peers and self.store.check([self._key(peer)]):
                host, pid = self.store.get(self._key(peer)).decode().split()
                self.joined_peers[peer] = (host, int(pid))

    # -- messages and exits ---------------------------------------------------------------------------------
    def _deadline_message(self) -> str:
        within = f"within {self.deadline_s:g} s (--dead-timeout)"
        if self.store is None:
            return f"could not reach the rendezvous {self.rendezvous} {within}"
        missing = [r for r in range(self.world_size) if r != self.rank and r not in self.joined_peers]
        me = socket.gethostname()
        stopped = [f"rank {r} is stopped (process {pid} on {host}: SIGSTOP, Ctrl-Z or a debugger)"
                   for r, (host, pid) in sorted(self.joined_peers.items())
                   if host == me and process_state(pid) in ("T", "t")]
        parts = stopped
        if missing:
            ranks = ", ".join(str(r) for r in missing[:8]) + (", ..." if len(missing) > 8 else "")
            parts = [f"rank{'s' if len(missing) > 1 else ''} {ranks} did not reach the rendezvous {within} "
                     f"(not started, stopped, or died at start-up)"] + stopped
        if not parts:
            parts = [f"the process group did not form {within} although every rank reached the rendezvous (a rank "
                     f"on another node may be stopped or unreachable: check the network between the nodes)"]
        return "; ".join(parts)

    def _handle_signals(self, timeout: float) -> None:
        if self._wakeup is None:
            self._done.wait(timeout)
            return
        got = self._wakeup.wait(timeout)
        if signal.SIGINT in got:
            self._interrupted()
        elif signal.SIGTERM in got:
            if launcher_gone(settle_s=SETTLE_S):
                self._launcher_died()
            else:
                self._fail("terminated by SIGTERM (a launcher stopping the job)", code=128 + signal.SIGTERM)

    def _launcher_died(self) -> None:
        """The kernel's parent-death signal (or a store lost with the launcher): one line, its rendezvous removed."""
        self._fail(f"terminated by SIGTERM: {launcher_gone()}", code=128 + signal.SIGTERM,
                   clean=remove_launcher_rendezvous)

    def _interrupted(self) -> None:
        if self._failing.acquire(blocking=False):
            if self.rank == 0:
                print("[rank 0] interrupted during start-up (the process group was forming); nothing was written",
                      file=sys.stderr, flush=True)
            os._exit(130)

    def _fail(self, message: str, code: int = 1, clean=None) -> None:
        if self._done.is_set() and code == 1 or not self._failing.acquire(blocking=False):
            return  # the group formed meanwhile, or the other thread is already exiting
        print(start_up_aborted_line(self.rank, message), file=sys.stderr, flush=True)
        if clean is not None:
            clean()
        os._exit(code)

    def _catch_signals(self) -> None:
        # the watcher acts on the wakeup byte; the handlers only let the main thread go on waiting
        self._wakeup = SignalWakeup.open({sig: lambda signum, frame: None for sig in (signal.SIGINT, signal.SIGTERM)})

    def _key(self, rank: int) -> str:
        return f"{KEY}/{self.attempt}/{rank}"


def _second_client(store):
    """A store client of the watcher's own: a TCPStore client holds one lock for the whole of a blocking get, so
    the watcher would wait behind the process group's own waits on the shared client."""
    import torch.distributed as dist

    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=30))
    return store
