"""Streaming safetensors writer: the header is known from the plan, tensors are appended one by one.

A shard never sits whole in memory: each tensor is written as soon as it is produced. The file is created
under a temporary name with mode 0644 and checksummed while written; `finish` fsyncs and renames it.

The sha256 runs on a hasher thread alongside the file write of the same bytes (both release the GIL), so
checksumming costs no extra time as long as hashing is faster than the disk.

Every `WRITEBACK_EVERY` bytes the writer asks the kernel to start writing the new bytes to disk
(`posix_fadvise(DONTNEED)` starts asynchronous write-back on Linux and returns). Without it the pages stay dirty
until the final fsync (the kernel's own write-back starts only at gigabytes of dirty memory): the disk idles
while the shard is produced and every shard ends with a long fsync, the last one on the job's critical path.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .st_format import DTYPE_TO_ST, encode_header

WRITEBACK_EVERY = 32 * 1024 * 1024


class ShardWriter:
    def __init__(self, final_path: str, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.final_path = final_path
        self.tmp_path = final_path + ".tmp"
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in tensors]
        self._next = 0
        header, _ = encode_header(self.expected, metadata)
        self._sha = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")  # FIFO keeps byte order
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.fchmod(fd, 0o644)  # whatever the umask: loaders run as other users
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._written = self._written_back = 0
        self._write(header)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        hashed = self._hasher.submit(self._sha.update, view)
        self._written += len(view)
        while len(view):
            n = self._f.write(view)
            view = view[n:]
        if self._written - self._written_back >= WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._f.fileno(), self._written_back, self._written - self._written_back,
                             os.POSIX_FADV_DONTNEED)
            self._written_back = self._written
        hashed.result()  # the caller may reuse the buffer once we return

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next ones the header declares."""
        exp_name, exp_dtype, exp_shape = self.expected[self._next]
        got = (name, DTYPE_TO_ST.get(tensor.dtype), tuple(tensor.shape))
        if got != (exp_name, exp_dtype, exp_shape):
            raise RuntimeError(f"shard {os.path.basename(self.final_path)}: expected {self.expected[self._next]}, got {got}")
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{name}: tensors must be on the host before writing")
        if tensor.numel():
            self._write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def finish(self, rename_to: str | None = None) -> str:
        """fsync and rename; returns the sha256 of the file bytes."""
        if self._next != len(self.expected):
            raise RuntimeError(f"shard {self.final_path}: {len(self.expected) - self._next} tensors not written")
        self._hasher.shutdown()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, rename_to or self.final_path)
        return self._sha.hexdigest()

    def abort(self) -> None:
        try:
            self._hasher.shutdown(wait=False)
            self._f.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
