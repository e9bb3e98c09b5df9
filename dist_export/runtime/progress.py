"""Progress of one rank's work, and rank 0's view of the whole job's (execute stage, every rank; the bar on rank 0).

`Progress` counts what the main thread and the pipeline finished (items, bytes) and every step of a long loop
(`tick`); `api.py` makes one per export and hands it to the stages that advance it (`execute_rank`, the
pipeline, `quantize_item`, `measure_group_amax`), whose default is `NO_PROGRESS` (counts nothing: `verify`,
`cli plan`, tests). The heartbeat (`monitor.py`) publishes the counters and watches the peers'; on rank 0 it hands
the job-wide sums to `show`: a tqdm bar on a terminal (or in a notebook), with log records routed around it
(tqdm's logging redirect) so no line is glued to the bar; elsewhere (Slurm logs, CI) a progress line every
`log_every` seconds. The bar appears once the plan's totals are known (`set_totals`) and is closed by `close`
when the job is complete (the job-wide count, never rank 0's alone), before the closing report; it is never
drawn again after that. `calibrate` has one too (`calibration_progress`: tokens for the bar, batches for the count).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)


class Progress:
    """Counters of this rank's work (thread-safe) and, on rank 0, the job's bar or progress lines.

    `bytes` is what the bar measures (`unit`: bytes of an export, "tok" tokens of a calibration), `items` the
    count shown beside it (`count`: "items", "batches"); `desc` names the bar."""

    def __init__(self, log_every: float | None = None, desc: str = "export", unit: str = "B", count: str = "items"):
        self.desc, self.unit, self.count = desc, unit, count
        self.items = self.bytes = self.steps = 0
        self.total_items = self.total_bytes = 0
        self._lock = threading.Lock()
        self._bar = None
        self._bar_closed = False
        self._redirect = None  # tqdm's logging redirect while the bar is shown
        self._bar_lock = threading.Lock()
        self.log_every = float(os.environ.get("DIST_EXPORT_LOG_EVERY", "30")) if log_every is None else log_every
        self._t0 = self._last_log = time.monotonic()

    # -- the work (main thread, pipeline threads) ---------------------------------------------------------------
    def tick(self) -> None:
        """The main thread made progress (called inside long loops)."""
        self.steps += 1

    def advance(self, items: int, nbytes: int) -> None:
        with self._lock:
            self.items += items
            self.bytes += nbytes
            self.steps += 1

    def set_totals(self, items: int, nbytes: int) -> None:
        self.total_items, self.total_bytes = items, nbytes

    # -- rank 0's view of the job (the heartbeat thread calls show; the main thread closes) ---------------------
    def show(self, done_bytes: int, done_items: int) -> None:
        """Draw the job-wide sums: the bar, or a progress line every `log_every` seconds without a terminal."""
        if self._bar_closed:
            return
        mode = bar_mode()
        if mode is None:
            self._log_progress(done_bytes, done_items)
            return
        with self._bar_lock:
            if self._bar_closed or not self.total_bytes:  # totals come with the plan; nothing to show before
                return
            if self._bar is None:
                self._bar = _new_bar(mode, self.total_bytes, self.desc, self.unit)
                if mode == "terminal":
                    from tqdm.contrib.logging import logging_redirect_tqdm

                    self._redirect = logging_redirect_tqdm()
                    self._redirect.__enter__()
            self._bar.n = min(done_bytes, self.total_bytes)
            self._bar.set_postfix_str(f"{self.count} {done_items}/{self.total_items}", refresh=False)
            self._bar.refresh()

    def close(self, complete: bool = False) -> None:
        """Close the bar for good (rank 0). `complete`: every planned item of every rank is on disk, so the bar
        ends at the job's totals; otherwise (a failure) it stays where it was and the error line follows it."""
        with self._bar_lock:
            self._bar_closed = True
            bar, self._bar = self._bar, None
            if bar is not None:
                if complete:
                    bar.n = self.total_bytes
                    bar.set_postfix_str(f"{self.count} {self.total_items}/{self.total_items}", refresh=False)
                    bar.refresh()
                bar.close()
            if self._redirect is not None:
                with contextlib.suppress(Exception):
                    self._redirect.__exit__(None, None, None)
                self._redirect = None

    def _log_progress(self, done_bytes: int, done_items: int) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_every or not self.total_bytes:
            return
        self._last_log = now
        elapsed = now - self._t0
        rate = done_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        percent = 100.0 * done_bytes / self.total_bytes
        if self.unit == "B":
            log.info("progress: %.2f/%.2f GB (%.0f%%), %d/%d %s, %.2f GB/s, ETA %.0f s", done_bytes / 1e9,
                     self.total_bytes / 1e9, percent, done_items, self.total_items, self.count, rate / 1e9, eta)
        else:
            log.info("%s progress: %d/%d %s, %d/%d %s (%.0f%%), %.0f %s/s, ETA %.0f s", self.desc, done_items,
                     self.total_items, self.count, done_bytes, self.total_bytes, self.unit, percent, rate, self.unit,
                     eta)


class _NoProgress(Progress):
    """Counts nothing and shows nothing: the default of every stage function that takes a `progress`."""

    def tick(self) -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        pass

    def set_totals(self, items: int, nbytes: int) -> None:
        pass

    def show(self, done_bytes: int, done_items: int) -> None:
        pass


NO_PROGRESS = _NoProgress()


def bar_mode() -> str | None:
    """"terminal" (stderr is a terminal, or DIST_EXPORT_PROGRESS=1), "notebook" (an IPython kernel: tqdm's
    widget), or None: periodic log lines instead (Slurm logs, CI, pipes). DIST_EXPORT_PROGRESS=0 forces None."""
    forced = os.environ.get("DIST_EXPORT_PROGRESS")
    if forced == "0":
        return None
    if forced == "1" or sys.stderr.isatty():
        return "terminal"
    if "ipykernel" in sys.modules:
        return "notebook"
    return None


def _new_bar(mode: str, total: int, desc: str, unit: str):
    if mode == "notebook":
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5)


def calibration_progress() -> Progress:
    """The calibration's counters: the bar measures tokens (padding excluded), the count is batches."""
    return Progress(desc="calibrate", unit="tok", count="batches")
