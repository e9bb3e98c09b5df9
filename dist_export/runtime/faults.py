"""Fault injection for tests and drills: make one rank fail in a chosen way at a chosen item.

Set `DIST_EXPORT_FAULT="<kind>:<rank>:<n>"` (or pass `Fault(...)` to `export`): on rank <rank>, just before
its n-th item (0-based) is quantized, the fault fires:
  raise   raise RuntimeError (a clean failure every rank reports)
  kill    SIGKILL this process (as the OOM killer would)
  hang    sleep forever in the main thread (heartbeats continue: a hung, not a dead, rank)
  delay   sleep 3 s once, then go on (a slow item: the progress bar and Ctrl-C tests watch a running job)
  enospc  raise OSError(ENOSPC) as a full disk would
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

KINDS = ("raise", "kill", "hang", "enospc", "delay")


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
        if n != self.at_item:
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault while processing {item_name}")
        if self.kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected) while writing {item_name}")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "delay":
            time.sleep(3.0)
            return
        while True:  # hang
            time.sleep(3600)


def fault_from_env() -> Fault | None:
    spec = os.environ.get("DIST_EXPORT_FAULT")
    if not spec:
        return None
    try:
        kind, rank, at = spec.split(":")
        return Fault(kind, int(rank), int(at))
    except ValueError:
        raise ValueError(f"DIST_EXPORT_FAULT={spec!r}: expected <kind>:<rank>:<item>, kinds {list(KINDS)}") from None
