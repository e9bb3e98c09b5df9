"""Logging with the rank in every line; rank 0 logs at INFO, other ranks only warnings unless verbose."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    level = logging.INFO if (rank == 0 or verbose) else logging.WARNING
    if os.environ.get("DIST_EXPORT_DEBUG"):
        level = logging.DEBUG
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
