"""GPU kernels (Triton) for the numerics: stage 2 (execute), every rank, on the rank's CUDA device.

The pure-torch functions in `dist_export.numerics` stay the definition and the CPU path; these kernels compute
the same functions with the same float32 element arithmetic (true division through `div_rn`, no fused
multiply-add, E4M3/E2M1 rounding written out in integer and float operations) and so give the same bits.
Each kernel reads a weight block once and keeps everything else (candidate scales, errors) in registers.

Triton is imported lazily, only when a tensor is on CUDA (or under TRITON_INTERPRET=1 for the tests on a CPU):
machines without Triton never import it. `DIST_EXPORT_KERNELS=0` turns the kernels off (the torch path runs).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot find its backend
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(t: torch.Tensor) -> bool:
    """True when a kernel should handle tensor `t`: on CUDA (or interpreted), Triton importable, not turned off."""
    if os.environ.get("DIST_EXPORT_KERNELS", "1") == "0":
        return False
    if not (t.is_cuda or interpreting()):
        return False
    return _triton_imports()
