"""A small ring of reusable host buffers (pinned when a GPU is used) for the per-rank pipeline.

Buffers are allocated once per rank, not per item. A buffer goes back to the ring with an optional CUDA event;
the next user waits for that event before overwriting it, so an asynchronous copy still reading (or writing)
the buffer is never overtaken. Items larger than a buffer take the plain (pageable, synchronous) path.
"""
from __future__ import annotations

import math
import queue

import torch


class HostRing:
    def __init__(self, count: int, nbytes: int, pinned: bool):
        self.nbytes = nbytes
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        self._free: queue.Queue = queue.Queue()
        for i in range(count):
            self._free.put((i, None))

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.nbytes

    def acquire(self, timeout: float | None = None) -> int:
        """Index of a free buffer (blocks); waits for the event its last user attached."""
        idx, event = self._free.get(timeout=timeout)
        if event is not None:
            event.synchronize()
        return idx

    def release(self, idx: int, event=None) -> None:
        self._free.put((idx, event))

    def view(self, idx: int, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        return self.buffers[idx][:nbytes].view(dtype).reshape(shape)


def ring_size_for(max_item_bytes: int, cap: int = 256 * 1024 * 1024) -> int:
    return max(1, min(max_item_bytes, cap))
