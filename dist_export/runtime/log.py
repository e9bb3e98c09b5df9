"""Logging with the rank in every line (every rank, all stages; set up by the command line): rank 0 logs at INFO,
other ranks only warnings unless verbose; Python warnings go through logging too.

Rank 0 draws the job's bar on the terminal (`progress.py`; its own records are routed around it by tqdm's logging
redirect). The other ranks of that terminal write to it directly, so their stderr is wrapped: a write that starts
a line first clears that line (erasing the bar drawn there) and every line ends with a newline, so their lines
(log records, warnings, error lines) stand on lines of their own and rank 0 redraws its bar below them at its
next refresh, as tqdm.write does. Their library progress bars (transformers' weight loading) are off. Output
written to file descriptor 2 below Python (C++ warnings) is not covered.
"""
from __future__ import annotations

import logging
import os
import sys

CLEAR_LINE = "\r\x1b[2K"  # carriage return, erase the whole line


class LineClearingStream:
    """A text stream whose writes that start a line clear the terminal line first (see the module docstring)."""

    def __init__(self, stream):
        self._stream = stream
        self._at_line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._at_line_start and not text.startswith("\r"):
            text = CLEAR_LINE + text
        self._at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    from .progress import bar_mode

    level = logging.INFO if (rank == 0 or verbose) else logging.WARNING
    if os.environ.get("DIST_EXPORT_DEBUG"):
        level = logging.DEBUG
    if rank != 0:
        _quiet_library_bars()
        if bar_mode() == "terminal" and not isinstance(sys.stderr, LineClearingStream):
            sys.stderr = LineClearingStream(sys.stderr)
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn as a record: rank 0's go around the bar, the others' clear it
    logging.getLogger("py.warnings").addFilter(_no_trailing_newline)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _no_trailing_newline(record: logging.LogRecord) -> bool:
    """A captured warning's text ends with a newline of its own: drop it (no blank line after each warning)."""
    if isinstance(record.msg, str):  # Python >= 3.11 logs the text as the message, older ones as "%s" % text
        record.msg = record.msg.rstrip("\n")
    record.args = tuple(a.rstrip("\n") if isinstance(a, str) else a for a in record.args or ())
    return True


def _quiet_library_bars() -> None:
    """No Hugging Face progress bars on ranks other than 0 (they would fight rank 0's for the terminal line)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
