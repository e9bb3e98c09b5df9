"""Fault injection for tests and drills: make one rank fail in a chosen way at a chosen item.

Set `DIST_EXPORT_FAULT="<kind>:<rank>:<n>"` (or pass `Fault(...)` to `export`): on rank <rank>, just before
its n-th item (0-based) is quantized (`calibrate`: before its n-th batch), the fault fires:
  raise   raise RuntimeError (a clean failure every rank reports)
  kill    SIGKILL this process (as the OOM killer would)
  hang    sleep forever in the main thread (heartbeats continue: a hung, not a dead, rank)
  delay   sleep 3 s once, then go on (a slow item: the progress bar and Ctrl-C tests watch a running job)
  talk    after 2 s, write a log warning, a Python warning and a stderr line, wait 1.5 s and go on (output of
          a rank beside rank 0's progress bar)
  enospc  raise OSError(ENOSPC) as a full disk would
  stop    SIGSTOP this process (a stopped, not a dead, rank: its pid stays)

Start-up faults fire before any item: `<kind>:<rank>:start` just before the rank reaches the rendezvous, and
`<kind>:<rank>:join` after it checked in there, while its peers form the process group (`dist.init_distributed`).
`<kind>:<rank>:commit` fires after every item was written, as the rank enters the commit step (rank 0 stages
and verifies the export there while its peers wait: `api._export`).
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

KINDS = ("raise", "kill", "hang", "enospc", "delay", "stop", "talk")
POINTS = ("start", "join", "commit")  # named points (fire_point_fault), not items


@dataclass
class Fault:
    kind: str
    rank: int
    at_item: int
    _seen: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; valid: {list(KINDS)}")

    def maybe_fire(self, rank: int, item_name: str) -> None:
        if rank != self.rank:
            return
        n, self._seen = self._seen, self._seen + 1
        if n == self.at_item:
            _fire(self.kind, f"while processing {item_name}", f"while writing {item_name}")


def _fire(kind: str, where: str, writing: str) -> None:
    if kind == "raise":
        raise RuntimeError(f"injected fault {where}")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected) {writing}")
    if kind in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        return
    if kind == "delay":
        time.sleep(3.0)
        return
    if kind == "talk":
        _talk(where)
        return
    while True:  # hang
        time.sleep(3600)


def fire_point_fault(point: str, rank: int) -> None:
    """DIST_EXPORT_FAULT=<kind>:<rank>:<point> with a point of POINTS: fire it here on that rank."""
    parts = os.environ.get("DIST_EXPORT_FAULT", "").split(":")
    if len(parts) == 3 and parts[2] == point and parts[1] == str(rank) and parts[0] in KINDS:
        where = f"at start-up ({point})" if point in ("start", "join") else f"at {point}"
        _fire(parts[0], where, where)


def _talk(where: str) -> None:
    import logging
    import sys
    import warnings

    rank = os.environ.get("RANK", "0")
    time.sleep(2.0)
    logging.getLogger(__name__).warning("injected log line from rank %s %s", rank, where)
    warnings.warn(f"injected Python warning from rank {rank}", UserWarning, stacklevel=1)
    print(f"[rank {rank}] injected stderr line {where}", file=sys.stderr, flush=True)
    time.sleep(1.5)


def fault_from_env() -> Fault | None:
    spec = os.environ.get("DIST_EXPORT_FAULT")
    if not spec or spec.rsplit(":", 1)[-1] in POINTS:  # none, or a fault at a named point (fire_point_fault)
        return None
    try:
        kind, rank, at = spec.split(":")
        return Fault(kind, int(rank), int(at))
    except ValueError:
        raise ValueError(f"DIST_EXPORT_FAULT={spec!r}: expected <kind>:<rank>:<item>, kinds {list(KINDS)}") from None
