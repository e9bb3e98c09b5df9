"""The output folder before and after the work: read-only checks on every rank, then rank 0, under the lock,
takes the folder over, removing only what it can prove it wrote.

Ownership: dist_export deletes or replaces only files it can prove it wrote. The proof is a record of ours that
names the file with its sha256 and size: the published export record (`dist_export.json`: `shards` and `files`)
and the resume manifest's shard records (`.dist_export/shards/*.json`, for an unfinished run). Anything else in
`--out` is foreign, a link always is (links are never followed, only listed): `--overwrite` and `--resume`
refuse a folder that holds a foreign file, naming it; `--allow-foreign-files` keeps foreign files alongside the
export, untouched, but a foreign file at a name the export writes is refused even then. `.dist_export/` (a real
folder, never a link) is the export's private working folder: the resume manifest and, in `tmp/`, every
temporary file of the export before its rename into place, so a killed run's leftovers are ours to remove.
`--out` equal to, inside or containing the source (links resolved) is refused before anything is written.

The lock is an `flock` on `<out>/.dist_export.lock` (opened without following a link): the kernel releases it
when the holder dies, so a crashed run never leaves the folder locked, while two live exports into one folder
are refused. Every clean-up runs under the lock, or removes only the temporaries its own process created
(`atomic.remove_own_temporaries`), so a refused second export never removes the running one's files.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat

from ..layout import INDEX_NAME, LOCK_NAME, MANIFEST_DIR, RECORD_NAME, SINGLE_NAME, STAGED_SUFFIX, export_tmp_dir
from .atomic import NOFOLLOW, read_regular

FOREIGN_OPTION = "--allow-foreign-files"


def tmp_dir(out_dir: str) -> str:
    """Where every file of the export is created before its rename into place (inside our private folder)."""
    return export_tmp_dir(out_dir)


class OutputLock:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None
        self.foreign: frozenset[str] = frozenset()  # foreign entries kept (--allow-foreign-files)
        self.published = False  # the folder holds a finished export of ours (index or single file)

    def acquire(self) -> None:
        """Hold the folder's lock. The lock is the file at `path` when it is flocked: a holder releasing
        (unlink, then close) may let us lock the inode it just unlinked, which a third export would not see, so
        after the flock the path must still name the locked file; else try again with the new one."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise ValueError(f"another export is writing into {os.path.dirname(self.path)} ({holder}); "
                                 f"wait for it or choose another --out") from None
            if self._names(fd):
                break
            os.close(fd)  # a released (unlinked) lock file: the folder's lock is the one at the path now
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{self.path} is a link; dist_export never writes through a link: remove it or "
                                 f"choose another --out") from None
            raise

    def _names(self, fd: int) -> bool:
        """The lock path still names the open file `fd` (not unlinked or replaced since it was opened)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_not_source(out_dir: str, source_dirs) -> None:
    """--out equal to, inside or containing a source folder (after resolving links) is refused."""
    out = _resolved(out_dir)
    for src_dir in source_dirs:
        if not src_dir:
            continue
        src = _resolved(src_dir)
        common = os.path.commonpath([out, src])
        if common in (out, src):
            how = "is" if out == src else ("lies inside" if common == src else "contains")
            raise ValueError(f"--out {out_dir} {how} the source folder {src_dir} (links resolved); exporting there "
                             f"could destroy the source: choose an --out outside it")


def check_output_dir(out_dir: str, overwrite: bool, resume: bool, allow_foreign: bool = False,
                     source_dirs=()) -> None:
    """Validate the target before any work (every rank may call this; it writes nothing)."""
    check_not_source(out_dir, source_dirs)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a folder; choose another --out")
    if os.path.isdir(out_dir):
        entries = [e for e in os.listdir(out_dir) if e != LOCK_NAME]
        if entries and not (overwrite or resume or allow_foreign):
            raise ValueError(f"output folder {out_dir} is not empty; pass --overwrite to replace an earlier export, "
                             f"--resume to finish an interrupted one, or {FOREIGN_OPTION} to export next to files "
                             f"that are not ours")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise ValueError(f"--out {out_dir} lies under {parent}, which is a file, not a folder; choose another --out")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out_dir} is not writable (no write permission on {parent}); choose "
                         f"another --out or grant write permission (chmod)")


# ------------------------------------------------------------------------------------------- ownership


def read_record(path: str) -> dict | None:
    """The export record at `path` if it is a regular file (not a link) in our schema, else None."""
    try:
        data = json.loads(read_regular(path, "record"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "dist_export" in data and isinstance(data.get("shards"), dict):
        return data
    return None


def _checked(info) -> dict | None:
    """A record entry that binds a file: its size and a whole-file sha256 or, for a shard several ranks wrote
    (storage/shared_shard.py), the sha256 of its header and of every tensor."""
    if not isinstance(info, dict) or not isinstance(info.get("size"), int) or isinstance(info.get("size"), bool):
        return None
    if isinstance(info.get("sha256"), str):
        return {"sha256": info["sha256"], "size": info["size"]}
    if isinstance(info.get("tensors"), dict) and isinstance(info.get("header_sha256"), str):
        return {k: info[k] for k in ("size", "tensors", "header_sha256")}
    return None


def _safe_rel(rel) -> bool:
    return isinstance(rel, str) and rel and not rel.startswith("/") and ".." not in rel.split("/") \
        and rel == os.path.normpath(rel)


def owned_files(out_dir: str) -> dict[str, dict]:
    """{relative path in --out: {"sha256", "size"}} of every file a record of ours names (present or not);
    entries from the resume manifest (an unfinished run's finished shards) carry "resume": True."""
    owned: dict[str, dict] = {}
    rec = read_record(os.path.join(out_dir, RECORD_NAME))
    for part in ("shards", "files"):
        for rel, info in ((rec or {}).get(part) or {}).items() if isinstance((rec or {}).get(part), dict) else []:
            if _safe_rel(rel) and (entry := _checked(info)) is not None:
                owned[rel] = entry
    shards = os.path.join(out_dir, MANIFEST_DIR, "shards")
    if _is_real_dir(os.path.join(out_dir, MANIFEST_DIR)) and _is_real_dir(shards):
        for f in sorted(os.listdir(shards)):
            if not f.endswith(".json"):
                continue
            try:
                shard_rec = json.loads(read_regular(os.path.join(shards, f), "shard record"))
            except (OSError, ValueError):
                continue
            name = f[: -len(".json")]
            if (entry := _checked(shard_rec)) is not None and _safe_rel(name) and "/" not in name:
                for rel in (name, name + STAGED_SUFFIX):  # a single file waits under its staging name
                    owned[rel] = {**entry, "resume": True}
    return owned


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _matches(path: str, entry: dict) -> bool:
    """The file at `path` (a regular file, checked by the caller) holds exactly the bytes `entry` binds."""
    from .shared_shard import check_shard

    try:
        return check_shard(path, entry) is None
    except (OSError, ValueError):
        return False


def _walk(out_dir: str, rel: str = ""):
    """(relative path, lstat) of every entry under `out_dir` except the lock and our private folder; links and
    other non-folders are yielded, real folders are descended into (never through a link)."""
    folder = os.path.join(out_dir, rel) if rel else out_dir
    for name in sorted(os.listdir(folder)):
        sub = f"{rel}/{name}" if rel else name
        if not rel and name in (LOCK_NAME, MANIFEST_DIR):
            continue
        st = os.lstat(os.path.join(out_dir, sub))
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(out_dir, sub)
        else:
            yield sub, st


def classify(out_dir: str, resume: bool = False) -> tuple[list[str], list[str]]:
    """(ours, foreign): relative paths of the files in --out that a record of ours names with their current size
    and sha256, and of every other entry (links, changed files, files no record names). Our record itself and
    `.dist_export/` (when a real folder) are ours and not listed. Under --resume an unfinished run's finished
    shard is taken by name and size: the reuse check hashes it next (and rewrites it if it changed)."""
    owned = owned_files(out_dir)
    ours, foreign = [], []
    if os.path.lexists(os.path.join(out_dir, MANIFEST_DIR)) and not _is_real_dir(os.path.join(out_dir, MANIFEST_DIR)):
        foreign.append(MANIFEST_DIR)
    for rel, st in _walk(out_dir):
        entry = owned.get(rel)
        if rel == RECORD_NAME and stat.S_ISREG(st.st_mode) and read_record(os.path.join(out_dir, rel)) is not None:
            ours.append(rel)
        elif entry is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
            foreign.append(rel)
        elif (resume and entry.get("resume")) or _matches(os.path.join(out_dir, rel), entry):
            ours.append(rel)
        else:
            foreign.append(rel)
    return ours, foreign


def _describe(out_dir: str, names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    kind = "a link" if os.path.islink(os.path.join(out_dir, names[0])) else "a file"
    return f"{names[0]!r}{more}, {kind}"


def clashes(foreign, will_write) -> list[str]:
    """Foreign entries at a name the export writes, or in the way of one (a foreign file or link where a
    folder of the export's path would be)."""
    out = set()
    for w in will_write:
        parts = w.split("/")
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) in foreign:
                out.add("/".join(parts[:i]))
    return sorted(out)


def refuse_clash(out_dir: str, clash: list[str]) -> None:
    raise ValueError(f"--out {out_dir} holds {_describe(out_dir, clash)} that this export would replace but that no "
                     f"record of dist_export names (or that changed since it was written); dist_export never "
                     f"replaces what it cannot prove it wrote: move it away or choose another --out")


def _remove_ours(out_dir: str, ours: list[str]) -> None:
    """Unpublish first (index, single file), then the rest; folders only where removing our files emptied them;
    `.dist_export` (our private folder) last."""
    first = [n for n in (INDEX_NAME, SINGLE_NAME) if n in ours]
    for rel in first + [n for n in ours if n not in first]:
        os.unlink(os.path.join(out_dir, *rel.split("/")))
    if first:
        fsync_dir(out_dir)
    folders = sorted({"/".join(rel.split("/")[:i]) for rel in ours for i in range(1, rel.count("/") + 1)},
                     key=lambda d: -d.count("/"))
    for d in folders:
        try:
            os.rmdir(os.path.join(out_dir, *d.split("/")))
        except OSError:  # not empty: it holds files that are not ours
            pass


def prepare_output_dir(out_dir: str, overwrite: bool, resume: bool, allow_foreign: bool = False,
                       will_write=(), source_dirs=(), fingerprint: dict | None = None) -> OutputLock:
    """Rank 0: create the folder, take the lock, then take the folder over. Under the lock: foreign files are
    refused (or, with allow_foreign, kept, unless at a name in `will_write`); --overwrite removes the files of
    ours; --resume keeps them, and of a finished export made from the same inputs (`fingerprint`, kept in its
    record) it reports `lock.published` (nothing to do), while one from other inputs is refused; without
    either flag a folder holding an export of ours is refused. A killed run's temporaries (in `.dist_export/tmp`) go."""
    check_output_dir(out_dir, overwrite, resume, allow_foreign, source_dirs)
    os.makedirs(out_dir, exist_ok=True)
    lock = OutputLock(out_dir)
    lock.acquire()
    try:
        ours, foreign = classify(out_dir, resume)
        if foreign and not allow_foreign:
            raise ValueError(f"--out {out_dir} holds {_describe(out_dir, foreign)} that no record of dist_export "
                             f"names (or that changed since it was written); dist_export never deletes what it "
                             f"cannot prove it wrote: move it away, choose another --out, or pass {FOREIGN_OPTION} "
                             f"to keep it alongside the export")
        clash = clashes(set(foreign), set(will_write) | {INDEX_NAME, SINGLE_NAME, RECORD_NAME, MANIFEST_DIR})
        if clash:
            refuse_clash(out_dir, clash)
        has_ours = bool(ours) or _is_real_dir(os.path.join(out_dir, MANIFEST_DIR))
        if has_ours and not (overwrite or resume):
            raise ValueError(f"--out {out_dir} holds an earlier export of dist_export ({(ours or [MANIFEST_DIR])[0]}); "
                             f"pass --overwrite to replace it or --resume to finish it")
        lock.published = resume and any(n in ours for n in (INDEX_NAME, SINGLE_NAME))
        if lock.published:
            old = (read_record(os.path.join(out_dir, RECORD_NAME)) or {}).get("fingerprint")
            if not isinstance(old, dict) or old != fingerprint:
                differ = sorted(k for k in set(old or {}) | set(fingerprint or {})
                                if (old or {}).get(k) != (fingerprint or {}).get(k)) if isinstance(old, dict) else []
                raise ValueError(f"--resume: {out_dir} holds a finished export made from other inputs (differs in: "
                                 f"{', '.join(differ) or 'unknown, its record has no fingerprint'}); there is "
                                 f"nothing to resume: pass --overwrite to replace it")
        if overwrite:
            _remove_ours(out_dir, ours)
            shutil.rmtree(os.path.join(out_dir, MANIFEST_DIR), ignore_errors=True)
        else:
            shutil.rmtree(tmp_dir(out_dir), ignore_errors=True)  # a killed run's temporaries: in our folder
        if not lock.published:
            os.makedirs(tmp_dir(out_dir), exist_ok=True)
        lock.foreign = frozenset(foreign)
    except BaseException:
        lock.release()
        raise
    return lock


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
