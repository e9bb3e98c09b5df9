"""Positioned reads of single tensors from safetensors files, and the one rule for joining names to a folder.

Used by every rank (sources, verify); reads only the bytes of the tensor asked for. Names cannot escape the
folder.
"""
from __future__ import annotations

import os

import torch

from .header import CorruptFileError, TensorMeta


def safe_join(folder: str, name: str, what: str = "file", root: str | None = None) -> str:
    """Join and refuse names that escape `folder` (absolute paths, `..`) or whose real path lies outside `root`
    (default `folder`; a Hub snapshot's files resolve into its repository's blobs/)."""
    if os.path.isabs(name) or name != os.path.normpath(name) or name.startswith(".."):
        raise ValueError(f"{what} {name!r} escapes the folder {folder}; refusing to read it: fix the "
                         f"index so every file lies inside the folder")
    path = os.path.join(folder, name)
    limit = os.path.realpath(root or folder)
    if os.path.commonpath([limit, os.path.realpath(path)]) != limit:
        raise ValueError(f"{what} {name!r} escapes the folder {folder}; refusing to read it: fix the "
                         f"index so every file lies inside the folder")
    return path


def read_tensor(folder: str, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with a positioned read (no mmap, no whole-file map).

    `out` is an optional reusable uint8 buffer (e.g. pinned host memory) of at least meta.nbytes; the
    returned tensor is a view into it, so the caller must finish with it before reusing the buffer.
    """
    path = os.path.join(folder, meta.file)
    buf = torch.empty(meta.nbytes, dtype=torch.uint8) if out is None else out[: meta.nbytes]
    view = memoryview(buf.numpy()) if meta.nbytes else memoryview(b"")
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < meta.nbytes:
            n = os.preadv(f.fileno(), [view[got:]], meta.start + got)
            if n <= 0:
                raise CorruptFileError(f"{meta.file}: unexpected end of file while reading {meta.name!r}")
            got += n
    return buf.view(meta.torch_dtype).reshape(meta.shape)
