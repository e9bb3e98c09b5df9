"""The output folder before and after the work (rank 0): refuse unsafe targets, hold a lock, clean up.

The lock is an `flock` on `<out>/.dist_export.lock`: the kernel releases it when the holder dies, so a
crashed run never leaves the folder locked, while two live exports into one folder are refused.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket

from ..layout import INDEX_NAME, LOCK_NAME, MANIFEST_DIR, OWN_PATTERNS, RECORD_NAME, SINGLE_NAME, TMP_PATTERNS


class OutputLock:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ValueError(f"another export is writing into {os.path.dirname(self.path)} ({holder}); "
                             f"wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def check_output_dir(out_dir: str, overwrite: bool, resume: bool) -> None:
    """Validate the target before any work (every rank may call this; it writes nothing)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir):
        entries = [e for e in os.listdir(out_dir) if e != LOCK_NAME]
        if entries and not (overwrite or resume):
            raise ValueError(f"output folder {out_dir} is not empty; pass --overwrite to replace an earlier export "
                             f"or --resume to finish an interrupted one")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise ValueError(f"--out {out_dir} lies under {parent}, which is a file, not a folder; choose another --out")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out_dir} is not writable (no write permission on {parent}); choose "
                         f"another --out or grant write permission (chmod)")


def prepare_output_dir(out_dir: str, overwrite: bool, resume: bool, format_files: tuple[str, ...] = ()) -> OutputLock:
    """Rank 0: create the folder, take the lock, remove a stale index (and, with --overwrite, old export files:
    `OWN_PATTERNS` and `format_files`, the names output formats add)."""
    check_output_dir(out_dir, overwrite, resume)
    os.makedirs(out_dir, exist_ok=True)
    lock = OutputLock(out_dir)
    lock.acquire()
    try:
        stale = [os.path.join(out_dir, INDEX_NAME), os.path.join(out_dir, SINGLE_NAME)]
        if overwrite and not resume:
            stale += previous_side_files(out_dir)
            stale += [p for pat in OWN_PATTERNS + tuple(format_files) for p in glob.glob(os.path.join(out_dir, pat))]
            shutil.rmtree(os.path.join(out_dir, MANIFEST_DIR), ignore_errors=True)
        stale += _temporaries(out_dir)
        for path in sorted(set(stale)):
            if os.path.isfile(path):
                os.unlink(path)
    except BaseException:
        lock.release()
        raise
    return lock


def previous_side_files(out_dir: str) -> list[str]:
    """Side files an earlier export wrote (its record's `side_files`, {relative path: sha256}) that are still
    regular files (never a link) with the bytes we wrote: only those are ours to remove on --overwrite."""
    import json

    from .manifest import file_sha256

    try:
        with open(os.path.join(out_dir, RECORD_NAME)) as f:
            listed = json.load(f).get("side_files") or {}
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    for rel, digest in listed.items() if isinstance(listed, dict) else []:
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
            continue
        path = os.path.join(out_dir, *rel.split("/"))
        if os.path.isfile(path) and not os.path.islink(path) and file_sha256(path) == digest:
            out.append(path)
    return out


def _temporaries(out_dir: str, sub: tuple[str, ...] = ()) -> list[str]:
    """Temporaries left in `out_dir` (also the hidden `.NAME.<random>.tmp` ones atomic.py creates; glob's `*`
    skips names starting with a dot)."""
    return [p for pat in TMP_PATTERNS for p in glob.glob(os.path.join(out_dir, *sub, pat))]


def remove_temporaries(out_dir: str) -> None:
    for path in _temporaries(out_dir) + _temporaries(out_dir, (MANIFEST_DIR, "*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
