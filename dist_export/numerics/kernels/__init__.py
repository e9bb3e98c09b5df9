"""GPU kernels (Triton) for the numerics: stage 2 (execute), every rank, on the rank's CUDA device.

The pure-torch functions in `dist_export.numerics` stay the definition and the CPU path; these kernels compute
the same functions with the same float32 element arithmetic (IEEE divisions: `div_rn`, or `div_by` for one
divisor per block; no implicit fused multiply-add; E4M3/E2M1 rounding written out in integer and float
operations) and so give the same bits.
Each kernel reads a weight block once and keeps everything else (candidate scales, errors) in registers.

The registry dispatches to them for CUDA tensors only (`enabled`); CPU tensors always take the torch path, also
under TRITON_INTERPRET=1 (the kernel tests call the kernels directly there). Triton is imported lazily, at the
first CUDA tensor: machines without Triton never import it. `DIST_EXPORT_KERNELS=0` turns the kernels off.
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
    """True when a kernel should handle tensor `t`: on CUDA, Triton importable, not turned off."""
    if not t.is_cuda or os.environ.get("DIST_EXPORT_KERNELS", "1") == "0":
        return False
    return _triton_imports()
