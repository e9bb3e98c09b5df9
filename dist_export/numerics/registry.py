"""Dispatch to the registered numeric formats: adding a format adds a module that calls `register_format`
(`spec.py` holds the table and `NumericFormat`, re-exported here), not an if/elif.

A format carries its own facts (`NumericFormat`'s fields: valid granularities and defaults, a fixed block size,
the tensor-amax rule, packing, its MSE-search fold, ModelOpt's description of it); recipes, the planner, the
amax rules, the MSE search, the vllm-fq state file and the ModelOpt mapping read them, and no module outside
a format's own one branches on a format's name. Each format supplies pure tensor functions (no I/O, no process
group):
  fake_quant(x, spec, amax, block_amax) -> float32 folded values (the caller casts once, RNE, to the weight dtype)
  quantize(x, spec, amax, block_amax)   -> dict of real-quant tensors (qdata and scales), or None if the format
                                           has no real-quant layout here
  dequantize(tensors, spec, shape)      -> float32 values that must equal fake_quant bit for bit
and optionally `kernels` (`kernels.formats.FormatKernels`): GPU kernels computing the same functions.

Dispatch: for a CUDA tensor, with Triton importable and `DIST_EXPORT_KERNELS` not "0", `fake_quant`,
`quantize` and the MSE search (`mse.search_block_amax`) run the format's kernel; a kernel that does not apply
(returns None: not 2-D, an INT search block over 256, an odd NVFP4 width) and every CPU tensor take the torch
functions, which stay the definition (the reference of the kernel tests). Both give the same bits
(docs/kernels.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import kernels as _kernels
from .blocks import check_finite, reduce_abs_max
from .spec import (NumericFormat, QuantSpec, attach_kernels, format_for_modelopt_bits, format_names,  # noqa: F401
                   get_format, register_format)


def has_tensor_amax(spec: Optional[QuantSpec]) -> bool:
    """The weight has one amax for the whole tensor (per-tensor granularity, or a tensor-amax format such as
    NVFP4): shared-amax groups apply; block amax is per block."""
    return spec is not None and (spec.granularity == "tensor" or get_format(spec.fmt).tensor_amax)


def compute_amax(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Weight amax under max calibration (float32), at the spec's granularity; a tensor-amax format (NVFP4)
    gives the tensor amax."""
    check_finite(w, name)
    if get_format(spec.fmt).tensor_amax:
        return reduce_abs_max(w, "tensor", None)
    return reduce_abs_max(w, spec.granularity, spec.block_size)


def kernel_for(fmt: NumericFormat, op: str, w: torch.Tensor) -> Optional[Callable]:
    """The format's GPU kernel for `op` ("fake_quant", "quantize", "search") if it should handle `w`, else None."""
    fn = getattr(fmt.kernels, op, None) if fmt.kernels is not None else None
    return fn if fn is not None and _kernels.enabled(w) else None


def fake_quant(
    w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold quantize+dequantize into `w`: fp32 math on w.float(), one RNE cast back to w.dtype."""
    fmt = get_format(spec.fmt)
    kernel = kernel_for(fmt, "fake_quant", w)
    y = kernel(w, spec, amax.to(w.device), block_amax) if kernel is not None else None
    if y is not None:
        return y
    return fmt.fake_quant(w.float(), spec, amax.to(w.device), block_amax).to(w.dtype)


def quantize(
    w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax: torch.Tensor | None = None, name: str = "tensor"
) -> dict:
    check_finite(w, name)
    fmt = get_format(spec.fmt)
    if fmt.quantize is None:
        raise ValueError(f"{name}: format {spec.fmt!r} has no real-quant layout")
    kernel = kernel_for(fmt, "quantize", w)
    out = kernel(w, spec, amax.to(w.device), block_amax) if kernel is not None else None
    if out is not None:
        return out
    return fmt.quantize(w.float(), spec, amax.to(w.device), block_amax)


def dequantize(tensors: dict, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    fmt = get_format(spec.fmt)
    if fmt.dequantize is None:
        raise ValueError(f"format {spec.fmt!r} has no real-quant layout")
    return fmt.dequantize(tensors, spec, shape)
