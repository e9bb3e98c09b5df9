"""Granularity helpers: per-block amax and broadcasting a block value back to elements.

Blocks follow formats.md section 5: zero-pad the blocked dims to a multiple of the block, reduce each block
(zeros never raise an amax), and crop back. Expanding a per-block value to element shape lets every format
apply its formula elementwise, which gives exactly the per-block result (the formulas are elementwise).
"""
from __future__ import annotations

import torch

from .spec import QuantSpec


def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Refuse NaN/inf weights: a folded NaN would load silently and poison every output."""
    if not torch.isfinite(w).all():
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise ValueError(f"{name}: weight has {n_nan} NaN and {n_inf} inf values; fix the source checkpoint")


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
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
        a = _pad_to(a, -1, b)
        return a.reshape(*a.shape[:-1], a.shape[-1] // b, b).amax(dim=-1)
    if granularity == "block":
        if a.dim() != 2:
            raise ValueError(f"2-D block quantization needs a 2-D weight, got shape {tuple(x.shape)}")
        a = _pad_to(_pad_to(a, 0, b), 1, b)
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


def compute_amax(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Weight amax under max calibration (float32), at the spec's granularity; NVFP4 gives the tensor amax."""
    check_finite(w, name)
    if spec.fmt == "nvfp4":
        return reduce_abs_max(w, "tensor", None)
    return reduce_abs_max(w, spec.granularity, spec.block_size)
