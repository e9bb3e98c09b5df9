"""Signal dispositions shared by the launcher and every rank (no heavy imports: `__main__` uses it first).

A handler that must run once swaps itself for `ignore_from_now_on`, never for SIG_IGN: CPython prints
"OSError: Signal 2 ignored due to race condition" with a traceback when a signal arrives while its disposition
becomes SIG_IGN (the C handler has already marked it pending, the Python one is gone). A Ctrl-C reaches a rank
twice, microseconds apart (the terminal's and the launcher's forwarded one), so that window was hit in CI; a
Python no-op handler absorbs the late one silently.
"""
import signal


def _absorb(signum, frame) -> None:
    """A late repeat of a signal already being handled: nothing to do."""


def ignore_from_now_on(sig: int) -> None:
    """Later deliveries of `sig` are absorbed by a Python no-op (see the module docstring), never SIG_IGN."""
    signal.signal(sig, _absorb)

