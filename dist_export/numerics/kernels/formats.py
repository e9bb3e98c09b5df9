"""Each format's GPU kernels behind the format functions' own signatures (stage 2, every rank).

A format registers these next to its torch functions (`registry.NumericFormat.kernels`); the registry and the
MSE search call them for CUDA tensors. Each returns None where its kernel does not apply (a weight that is not
2-D, an INT search block over `search.MAX_INT_BLOCK`, an odd NVFP4 width), and the torch path runs instead.
Triton is imported only inside the functions, so importing this module costs nothing on a CPU-only machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class FormatKernels:
    """fake_quant(w, spec, amax, block_amax) -> folded w in w.dtype; quantize(...) -> real-quant dict;
    search(w, spec, amax) -> (amax, block_amax) as mse.search_block_amax. Any may be None or return None."""

    fake_quant: Optional[Callable] = None
    quantize: Optional[Callable] = None
    search: Optional[Callable] = None


def _two_d(w: torch.Tensor) -> bool:
    """The kernels take 2-D weights whose rows are contiguous (a transposed expert matrix is copied first)."""
    return w.dim() == 2 and w.numel() > 0


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()


# ---- FP8 E4M3 (tensor, channel, 2-D block) ----

def fp8_fake_quant(w, spec, amax, block_amax=None):
    if not _two_d(w):
        return None
    from .fold import fold_fp8

    return fold_fp8(_rows(w), spec.granularity, spec.block_size, amax, w.dtype)


def fp8_quantize(w, spec, amax, block_amax=None):
    if not _two_d(w):
        return None
    from .fold import encode_fp8

    codes, inv = encode_fp8(_rows(w), spec.granularity, spec.block_size, amax)
    return {"qdata": codes, "scale_inv": inv}


FP8 = FormatKernels(fake_quant=fp8_fake_quant, quantize=fp8_quantize)


# ---- symmetric INT8 / INT4 (tensor, channel, group) ----

def int_fake_quant(w, spec, amax, block_amax=None):
    if not _two_d(w):
        return None
    from ..integer import int_range
    from .fold import fold_int

    maxb, minb = int_range(spec.fmt)
    return fold_int(_rows(w), spec.granularity, spec.block_size, amax, maxb, minb, w.dtype)


def int_search(w, spec, amax):
    from ..blocks import reduce_abs_max
    from ..integer import int_range
    from ..mse import candidate_ratios
    from .search import int_search_supported, search_int

    block = spec.block_size if spec.granularity == "group" else w.shape[-1]
    if not _two_d(w) or not int_search_supported(block):
        return None
    base = amax.float() if spec.granularity == "group" else reduce_abs_max(w, "group", block)
    maxb, minb = int_range(spec.fmt)
    chosen = search_int(w, base, candidate_ratios(spec.mse_candidates, w.device), block, maxb, minb)
    if spec.granularity == "tensor":
        return chosen.amax(), None
    return chosen.reshape(base.shape), None


INT = FormatKernels(fake_quant=int_fake_quant, search=int_search)


# ---- NVFP4 (E2M1 in blocks of 16, E4M3 block scales, fp32 global scale) ----

def nvfp4_fake_quant(w, spec, amax, block_amax=None):
    if not _two_d(w):
        return None
    from .fold import fold_nvfp4

    return fold_nvfp4(_rows(w), amax, block_amax, w.dtype)


def nvfp4_quantize(w, spec, amax, block_amax=None):
    if not _two_d(w) or w.shape[-1] % 2:
        return None  # the torch path gives the refusal for an odd width
    from .fold import encode_nvfp4

    packed, scales, gs, bad = encode_nvfp4(w, amax, block_amax)
    if int(bad.item()):  # one host sync, as the torch path's check; the torch path raises its refusal
        from ..registry import get_format

        return get_format("nvfp4").quantize(w.float(), spec, amax, block_amax)
    return {"qdata": packed, "weight_scale": scales, "weight_scale_2": gs.reshape(())}


def nvfp4_search(w, spec, amax):
    if not _two_d(w):
        return None
    from ..mse import candidate_ratios
    from ..nvfp4 import global_scale
    from .search import search_nvfp4

    return amax, search_nvfp4(w, global_scale(amax), candidate_ratios(spec.mse_candidates, w.device))


NVFP4 = FormatKernels(fake_quant=nvfp4_fake_quant, quantize=nvfp4_quantize, search=nvfp4_search)


def _attach() -> None:
    from ..registry import attach_kernels

    for name, kernels in (("fp8", FP8), ("int8", INT), ("int4", INT), ("nvfp4", NVFP4)):
        attach_kernels(name, kernels)


_attach()
