"""Granularity helpers: per-block amax and broadcasting a block value back to elements.

Blocks follow formats.md section 5: zero-pad the blocked dims to a multiple of the block, reduce each block
(zeros never raise an amax), and crop back. Expanding a per-block value to element shape lets every format
apply its formula elementwise, which gives exactly the per-block result (the formulas are elementwise).

Pure functions: every rank, execute stage.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_DEFERRED = threading.local()


def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Refuse NaN/inf weights: a folded NaN would load silently and poison every output.

    Inside `deferred_finite_checks()` (the pipeline's main thread) a CUDA tensor is not checked at once (that
    would wait for the GPU): its NaN and inf counts are recorded, still on the device, and the caller refuses
    the item with `raise_if_nonfinite` before any of its bytes are written."""
    log = getattr(_DEFERRED, "log", None)
    if log is not None and w.is_cuda:
        log.append((name, torch.stack([torch.isnan(w).sum(), torch.isinf(w).sum()])))
        return
    if not torch.isfinite(w).all():
        _refuse(name, int(torch.isnan(w).sum()), int(torch.isinf(w).sum()))


class CopiedName(str):
    """The name of a deferred check of a copied (not quantized) tensor: refused with `check_finite_copy`'s line."""


COPY_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite_copy(t: torch.Tensor, name: str) -> None:
    """Refuse a copied (not quantized) float tensor holding NaN/inf, as read (reader thread, host memory).

    aminmax propagates NaN and shows +-inf, so one pass of min/max decides (0.38 s per GiB of bf16 on one core,
    measured; isfinite().all() took 9.7 s there: it builds a bool tensor first). FP8 and integer tensors are not
    checked. `--allow-nonfinite` skips the check. An encoded source weight decoded on a GPU (main thread, inside
    `deferred_finite_checks`) is counted on the device like a quantized one and refused with this message."""
    if t.dtype not in COPY_CHECKED_DTYPES or t.numel() == 0:
        return
    log = getattr(_DEFERRED, "log", None)
    if log is not None and t.is_cuda:
        log.append((CopiedName(name), torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum()])))
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        _refuse_copy(name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))


def _refuse_copy(name: str, n_nan: int, n_inf: int) -> None:
    raise ValueError(f"copied tensor {name!r} has {n_nan} NaN and {n_inf} inf values; fix the source checkpoint, "
                     f"or pass --allow-nonfinite to copy it as it is")


def _refuse(name: str, n_nan: int, n_inf: int) -> None:
    raise ValueError(f"{name}: weight has {n_nan} NaN and {n_inf} inf values; fix the source checkpoint")


@contextlib.contextmanager
def deferred_finite_checks(log: list | None = None):
    """Collect check_finite's device-side counts in `log` (a new list if None) instead of syncing per tensor."""
    log = [] if log is None else log
    previous = getattr(_DEFERRED, "log", None)
    _DEFERRED.log = log
    try:
        yield log
    finally:
        _DEFERRED.log = previous


def raise_if_nonfinite(names: list[str], counts: torch.Tensor) -> None:
    """counts [n, 2] (NaN, inf) on the host, one row per name, as recorded by `deferred_finite_checks` (a
    `CopiedName` gets the copied-tensor refusal)."""
    for name, (n_nan, n_inf) in zip(names, counts.tolist()):
        if n_nan or n_inf:
            (_refuse_copy if isinstance(name, CopiedName) else _refuse)(str(name), int(n_nan), int(n_inf))


def pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """`x` zero-padded along `dim` to a multiple of `multiple` (x itself when it already is one)."""
    size = x.shape[dim]
    pad = (-size) % multiple
    if pad == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = pad
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def reduce_abs_max(x: torch.Tensor, granularity: str, block_size: int | None) -> torch.Tensor:
    """max|x| at `granularity`, float32; x is at least 1-D, blocks need 2-D."""
    a = x.float().abs()
    if granularity == "tensor":
        return a.amax() if a.numel() else a.new_zeros(())
    if granularity == "channel":
        return a.reshape(a.shape[0], -1).amax(dim=1, keepdim=True)
    b = block_size
    if granularity == "group":
        a = pad_to(a, -1, b)
        return a.reshape(*a.shape[:-1], a.shape[-1] // b, b).amax(dim=-1)
    if granularity == "block":
        if a.dim() != 2:
            raise ValueError(f"2-D block quantization needs a 2-D weight, got shape {tuple(x.shape)}")
        a = pad_to(pad_to(a, 0, b), 1, b)
        m, n = a.shape
        return a.reshape(m // b, b, n // b, b).amax(dim=(1, 3))
    raise ValueError(f"unknown granularity {granularity!r}")


def expand_to(values: torch.Tensor, shape: torch.Size, granularity: str, block_size: int | None) -> torch.Tensor:
    """Broadcast a per-granularity tensor (amax or scale) to element `shape` (cropping partial blocks)."""
    if granularity in ("tensor", "channel"):
        return values.expand(shape) if values.dim() else values
    b = block_size
    if granularity == "group":
        return values.repeat_interleave(b, dim=-1)[..., : shape[-1]]
    return values.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)[: shape[0], : shape[1]]
