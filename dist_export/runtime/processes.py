"""Process state from /proc (every rank's monitor and start-up watch, and the torch-free launcher parent): one
place that says whether a local process is alive, gone, a zombie or stopped."""
from __future__ import annotations

import os


def process_state(pid: int) -> str | None:
    """None when the process is gone (or a zombie), else its state letter from /proc (R, S, D, T stopped, t traced),
    '?' where /proc cannot tell."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((line.split()[1] for line in f if line.startswith("State:")), "?")
    except OSError:
        return None
    return None if state in ("Z", "X") else state


class SignalWakeup:
    """Signals seen by a watcher thread while the main thread sits in a C call (a rendezvous, a collective), where
    no Python handler runs: the interpreter's C handler writes each signal's number into a pipe
    (`signal.set_wakeup_fd`) and the watcher selects on it. Opened and closed by the main thread."""

    def __init__(self, read_fd: int, write_fd: int, old_fd: int, old_handlers: dict):
        self.read_fd, self.write_fd, self._old_fd, self._old_handlers = read_fd, write_fd, old_fd, old_handlers

    @classmethod
    def open(cls, handlers: dict) -> "SignalWakeup | None":
        """Install `handlers` ({signal: handler}) with the pipe; None off the main thread of the main interpreter."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r), os.close(w)
            return None
        return cls(r, w, old_fd, {sig: signal.signal(sig, h) for sig, h in handlers.items()})

    def wait(self, timeout: float) -> bytes:
        """The signal numbers that arrived within `timeout` s (b'' if none, or once closed)."""
        import contextlib
        import select

        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select([self.read_fd], [], [], timeout)
            return os.read(self.read_fd, 64) if ready else b""
        return b""

    def poke(self) -> None:
        """Wake a waiting watcher now (a zero byte: no signal)."""
        import contextlib

        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")

    def close(self) -> None:
        """Restore the previous wakeup fd and handlers, close the pipe (main thread)."""
        import signal

        signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        os.close(self.read_fd), os.close(self.write_fd)
