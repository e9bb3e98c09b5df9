"""Stage 2, every rank: one shard file written by several ranks of one node, each at its planned offsets (issue 17).

The header comes from the plan, so every tensor's byte range is known before any tensor exists. A shard file's life:

1. `create_shared` (the shard's creator, one of its writers, in the "create shards" step): a private temporary of ours
   (`atomic.create_private`: O_CREAT|O_EXCL|O_NOFOLLOW, mode 0644), the header written and the file extended to
   its planned size (the data area reads as zeros until written). The returned `SharedHandle` (temporary path,
   device, inode, size) reaches every writer of the shard through that step's gather.
2. `PartWriter` (every writer, the creator too): opens the temporary with O_WRONLY|O_NOFOLLOW (no O_CREAT, no
   O_TRUNC: a late opener never erases a peer's bytes) and refuses it unless it is the very file created (same
   device, inode and size: a link or a swapped file is never written into). It writes only its own tensors, in
   plan order, at their offsets (positioned writes in pieces from a pool of threads, as `shard_file.py`), hashes
   each tensor's bytes (sha256 per tensor, on its own thread, alongside the writes) and, on `finish`, fsyncs.
3. `complete_part` (every writer, after its fsync): records its part (its tensors' checksums, bound to the
   temporary's identity) in the resume manifest, then reads every part record of the shard. The writer that finds
   every planned tensor covered writes the shard record and renames the temporary to its staged name. Each writer
   writes its own record before it reads the others', so the last one to finish always sees all of them (two that
   finish together may both see them; the second rename finds no temporary and the staged file in place). A shard
   is therefore never renamed before every byte range of it is fsynced, and a killed writer's shard keeps its
   temporary name (never published; the failure clean-up removes it, `--resume` rewrites that shard).

The shard record holds the sha256 of the header and of every tensor, never the whole file's: several writers cannot
hash one file in order without reading it back, and the record must not depend on the world size. The header and
the tensors tile the file exactly (safetensors has no gaps), so checking both (`check_shard`) checks every byte.
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .atomic import NOFOLLOW, create_private, discard, rename_into_place
from .header import DTYPE_TO_ST, encode_header, file_tensor_metas
from ..tensor_checksums import SOURCE_CRC_KEY, file_sha256, sha256_ranges
from .shard_file import PIECE, when_all, write_piece

METADATA = {"format": "pt"}


@dataclass(frozen=True)
class SharedHandle:
    """What a writer needs to open a shard file another rank created (small: it crosses ranks)."""

    tmp_path: str
    dev: int
    ino: int
    size: int

    @property
    def ident(self) -> str:
        """Binds part records to this one temporary (a stale record of an earlier file never counts)."""
        return f"{self.dev}:{self.ino}:{os.path.basename(self.tmp_path)}"


def layout(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes, {tensor: absolute [start, end)}) of a shard from the plan alone."""
    header, starts = encode_header([(n, d, tuple(s)) for n, d, s in tensors], METADATA)
    ranges = {}
    for (name, dtype, shape), start in zip(tensors, starts):
        nbytes = _nbytes(dtype, shape)
        ranges[name] = (len(header) + start, len(header) + start + nbytes)
    return header, ranges


def _nbytes(dtype: str, shape) -> int:
    from .header import ST_ITEMSIZE

    n = ST_ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def header_sha256(tensors) -> str:
    return hashlib.sha256(layout(tensors)[0]).hexdigest()


def create_shared(final_path: str, tensors, tmp_dir: str | None = None) -> SharedHandle:
    """Create the private temporary of `final_path`'s shard: header written, planned size, fsynced later by the
    writers. Only the shard's creator (`ShardPlan.creator`) calls this."""
    header, ranges = layout(tensors)
    size = max([len(header)] + [end for _, end in ranges.values()])
    fd, tmp = create_private(final_path, tmp_dir)
    try:
        write_piece(fd, memoryview(header), 0)
        os.ftruncate(fd, size)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        discard(tmp)
        raise
    os.close(fd)
    return SharedHandle(tmp, st.st_dev, st.st_ino, size)


def open_shared(handle: SharedHandle) -> int:
    """A write descriptor on the temporary `handle` names, refused unless it is that very file."""
    try:
        fd = os.open(handle.tmp_path, os.O_WRONLY | NOFOLLOW)
    except OSError as e:
        raise RuntimeError(f"shard temporary {os.path.basename(handle.tmp_path)} cannot be opened ({e.strerror}); "
                           f"another process removed or replaced it: rerun with --resume") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (handle.dev, handle.ino) or st.st_size != handle.size:
        os.close(fd)
        raise RuntimeError(f"shard temporary {os.path.basename(handle.tmp_path)} is not the file its creator made "
                           f"(replaced or resized); refusing to write into it: rerun with --resume")
    return fd


class PartWriter:
    """This rank's tensors of one shared shard: `write_async(name, tensor, done)` in plan order (the order of
    `mine`), `finish()` -> {tensor: sha256} after fsync. `abort()` waits for the writes in flight and closes; it
    never removes the temporary (peers may be writing into it; the failure clean-up removes it)."""

    def __init__(self, handle: SharedHandle, filename: str, tensors, mine: list[str],
                 pool: ThreadPoolExecutor | None = None, max_in_flight: int = 1 << 30):
        self.handle, self.filename = handle, filename
        specs = {n: (n, d, tuple(s)) for n, d, s in tensors}
        missing = [n for n in mine if n not in specs]
        if missing:
            raise RuntimeError(f"shard {filename}: tensors {missing[:3]} are not in its planned layout")
        _, self._ranges = layout(list(tensors))
        self.expected = [specs[n] for n in mine]
        self._next = 0
        self.sums: dict[str, str] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-tensor")
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="pwrite")
        self._in_flight: list = []  # (futures, nbytes), oldest first
        self._in_flight_bytes = 0
        self.max_in_flight = max_in_flight
        self._fd = open_shared(handle)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_async(name, tensor)
        self._drain(0)

    def write_async(self, name: str, tensor: torch.Tensor, done=None) -> None:
        if self._next >= len(self.expected):
            raise RuntimeError(f"shard {self.filename}: {name!r} is not one of this rank's tensors here")
        want = self.expected[self._next]
        got = (name, DTYPE_TO_ST.get(tensor.dtype), tuple(tensor.shape))
        if got != want:
            raise RuntimeError(f"shard {self.filename}: expected {want}, got {got}")
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{name}: tensors must be on the host before writing")
        self._next += 1
        start, end = self._ranges[name]
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B") if end > start \
            else memoryview(b"")
        futures = [self._pool.submit(write_piece, self._fd, data[i:i + PIECE], start + i)
                   for i in range(0, len(data), PIECE)]
        futures.append(self._hasher.submit(self._hash, name, data))
        if done is not None:
            when_all(futures, done)
        self._in_flight.append((futures, len(data)))
        self._in_flight_bytes += len(data)
        self._drain(self.max_in_flight)

    def _hash(self, name: str, data: memoryview) -> None:
        self.sums[name] = hashlib.sha256(data).hexdigest()

    def _drain(self, limit: int) -> None:
        while self._in_flight and (self._in_flight_bytes > limit or all(f.done() for f in self._in_flight[0][0])):
            futures, nbytes = self._in_flight.pop(0)
            for f in futures:
                f.result()
            self._in_flight_bytes -= nbytes

    def finish(self) -> dict[str, str]:
        """Wait for every write and hash, fsync, close; {tensor: sha256} of this rank's tensors in plan order."""
        if self._next != len(self.expected):
            raise RuntimeError(f"shard {self.filename}: {len(self.expected) - self._next} of this rank's tensors "
                               f"not written")
        try:
            self._drain(0)
            self._shutdown()
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = None
        return {n: self.sums[n] for n, _, _ in self.expected}

    def abort(self) -> None:
        for futures, _ in self._in_flight:
            for f in futures:
                f.exception()
        self._in_flight.clear()
        self._shutdown()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _shutdown(self) -> None:
        self._hasher.shutdown()
        if self._own_pool:
            self._pool.shutdown()


def complete_part(manifest, rank: int, handle: SharedHandle, filename: str, tensors, sums: dict[str, str],
                  staged: str, source_crcs: dict[str, str] | None = None) -> dict | None:
    """Record this rank's part (`source_crcs`: {item: crc32 of the source bytes it was made from}); if every
    planned tensor of the shard is now recorded, write the shard record (with every writer's source crc32s) and
    rename the temporary to `staged`. Returns the shard record when this rank completed the shard, else None."""
    manifest.record_part(filename, rank, handle.ident, sums, source_crcs or {})
    parts, crcs = manifest.parts(filename, handle.ident, with_sources=True)
    planned = [n for n, _, _ in tensors]
    if set(parts) != set(planned):
        return None
    info = {"size": handle.size, "header_sha256": header_sha256(tensors),
            "tensors": {n: parts[n] for n in planned}}
    # the record exists before the file has its staged name; the source crc32s bind a resume to the source bytes
    manifest.record_shard(filename, {**info, SOURCE_CRC_KEY: crcs})
    try:
        rename_into_place(handle.tmp_path, staged)
    except FileNotFoundError:
        if not os.path.isfile(staged):  # not a peer that completed it at the same moment: removed under us
            raise RuntimeError(f"shard {filename}: its temporary vanished before it was complete; rerun with "
                               f"--resume") from None
    return info


def check_shard(path: str, info: dict, label: str | None = None, tick=None) -> str | None:
    """None if `path` holds exactly the bytes `info` (a shard record) describes, else the first difference.
    Records with a whole-file `sha256` (exports before issue 17) are checked by that. `tick()` per chunk hashed."""

    name = label or os.path.basename(path)
    if os.path.islink(path) or not os.path.isfile(path):
        return f"{name}: not a regular file"
    size = os.path.getsize(path)
    if info.get("size") is not None and size != info["size"]:
        return f"{name}: {size} bytes, the export record says {info['size']}"
    if "tensors" not in info:
        if file_sha256(path, tick=tick) != info.get("sha256"):
            return f"{name}: sha256 differs from the export record (the file changed after export)"
        return None
    try:
        metas = file_tensor_metas(os.path.dirname(path), os.path.basename(path), path)
    except ValueError as e:
        return str(e)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        head = f.read(8 + n)
    if hashlib.sha256(head).hexdigest() != info.get("header_sha256"):
        return f"{name}: header differs from the export record"
    want = info["tensors"]
    ranges = {m.name: (m.start, m.end) for m in metas}
    if set(ranges) != set(want):
        return f"{name}: tensors {sorted(set(ranges) ^ set(want))[:3]} differ from the export record"
    got = sha256_ranges(path, ranges, tick=tick)
    bad = [n for n in want if got[n] != want[n]]
    if bad:
        return f"{name}: bytes of tensor(s) {bad[:3]} differ from the export record (the file changed after export)"
    return None
