"""Files written whole or not at all, and never through a link (every rank; rank 0 for the small files).

Every file we write starts under a private temporary name that this process creates itself (`O_CREAT|O_EXCL|
O_NOFOLLOW`: a name planted in advance, a link included, makes the create fail instead of being followed), is
fsynced and then renamed over its final name; `rename` replaces a link at the final name, it never writes through
it. Only files this process created are ever chmod'ed (through their own descriptor). The temporary names this
process holds are registered, so a failure clean-up removes exactly those and nothing else: no pattern is ever
globbed in a folder that other processes (another export, the user) may be writing into.
"""
from __future__ import annotations

import os
import secrets
import threading

from ..layout import private_tmp_name

_OWN_TEMPS: set[str] = set()
_LOCK = threading.Lock()
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def create_private(final_path: str, tmp_dir: str | None = None) -> tuple[int, str]:
    """(fd, temporary path) of a new file of ours, mode 0644, for `final_path`: `.NAME.<random>.tmp` in
    `tmp_dir` (default: the final file's folder). Registered until `rename_into_place` or `discard`."""
    folder = tmp_dir or os.path.dirname(final_path) or "."
    path = os.path.join(folder, private_tmp_name(os.path.basename(final_path), secrets.token_hex(6)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    with _LOCK:
        _OWN_TEMPS.add(path)
    os.fchmod(fd, 0o644)  # our own new file, whatever the umask: loaders may run as other users
    return fd, path


def rename_into_place(tmp: str, final_path: str) -> None:
    os.replace(tmp, final_path)
    with _LOCK:
        _OWN_TEMPS.discard(tmp)


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    with _LOCK:
        _OWN_TEMPS.discard(tmp)


def remove_own_temporaries() -> None:
    """Failure clean-up: remove the temporary files this process created and has not renamed (nothing else)."""
    with _LOCK:
        paths = sorted(_OWN_TEMPS)
    for p in paths:
        discard(p)


def write_atomic(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Write `path` whole (private temporary file, fsync, rename); a link at `path` is replaced, not followed."""
    fd, tmp = create_private(path, tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        rename_into_place(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def read_regular(path: str, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file and not itself a link (callers resolve links first)."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{what} {path} is not a regular file; refusing to read it: replace it with the file itself")
        chunks = []
        while True:
            block = os.read(fd, 1 << 24)
            if not block:
                return b"".join(chunks)
            chunks.append(block)
    finally:
        os.close(fd)
