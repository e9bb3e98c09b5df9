"""FP8 E4M3 (per tensor, per channel, per 2-D block), formats.md section 5.

    a = amax (1.0 where amax <= 2**-24);  scale = 448 / a;  inv = 1 / scale
    y = float8_e4m3fn(clamp(x * scale, -448, 448)).float() * inv        # multiply by inv, never divide

Real quant stores the E4M3 codes and `inv` (the exact multiplier of the fold), so that
codes.float() * inv reproduces the fold bit for bit.

Pure functions: every rank, execute stage (registered as numeric formats at import).
"""
from __future__ import annotations

import torch

from .blocks import expand_to
from .constants import AMAX_TINY, F8E4M3_MAX
from .registry import NumericFormat, register_format
from .spec import QuantSpec


def choose_fp8_inv_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inv) per amax element; an amax of 0 behaves as 1 so nothing becomes NaN."""
    a = amax.float()
    a = torch.where(a <= AMAX_TINY, torch.ones_like(a), a)
    # Tensor-by-tensor true division: `const / tensor` and CUDA's `tensor / const` multiply by a rounded
    # reciprocal instead, which differs from the formula in the last bit.
    scale = torch.full_like(a, F8E4M3_MAX) / a
    return scale, torch.ones_like(scale) / scale


def _fp8_codes(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale, inv = choose_fp8_inv_scale(amax)
    scale_el = expand_to(scale, x.shape, spec.granularity, spec.block_size)
    codes = torch.clamp(x * scale_el, -F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, inv


def fake_quant_fp8(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax=None) -> torch.Tensor:
    codes, inv = _fp8_codes(x, spec, amax)
    return codes.float() * expand_to(inv, x.shape, spec.granularity, spec.block_size)


def quantize_fp8(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax=None) -> dict:
    codes, inv = _fp8_codes(x, spec, amax)
    return {"qdata": codes, "scale_inv": inv.float().contiguous()}


def dequantize_fp8(tensors: dict, spec: QuantSpec, shape) -> torch.Tensor:
    inv = tensors["scale_inv"].float()
    return tensors["qdata"].float() * expand_to(inv, torch.Size(shape), spec.granularity, spec.block_size)


register_format(NumericFormat("fp8", fake_quant_fp8, quantize_fp8, dequantize_fp8,
                             granularities=("tensor", "channel", "block"), activations=True, modelopt_num_bits=(4, 3)))
