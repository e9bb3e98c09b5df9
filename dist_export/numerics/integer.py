"""Symmetric INT8 / INT4 (per tensor, per channel, per group), formats.md section 5.

    scale = float32(maxb) / amax;  amax <= 2**-24 -> y = 0
    y = clamp(round_half_even(x * scale), minb, maxb) / scale          # divide here (not multiply)

Pure functions: every rank, execute stage (registered as numeric formats at import).
"""
from __future__ import annotations

import torch

from .blocks import expand_to
from .constants import AMAX_TINY
from .registry import NumericFormat, register_format
from .spec import QuantSpec

BITS = {"int8": 8, "int4": 4}


def int_range(fmt: str, narrow_range: bool = False) -> tuple[float, float]:
    maxb = float(2 ** (BITS[fmt] - 1) - 1)
    return maxb, (-maxb if narrow_range else -maxb - 1)


def fake_quant_int_elementwise(x: torch.Tensor, amax_el: torch.Tensor, fmt: str) -> torch.Tensor:
    """The integer formula on an amax already broadcast to x's shape."""
    maxb, minb = int_range(fmt)
    zero = amax_el <= AMAX_TINY
    safe = torch.where(zero, torch.ones_like(amax_el), amax_el)
    scale = torch.full_like(safe, maxb) / safe  # true division (see fp8.choose_fp8_inv_scale)
    y = torch.clamp(torch.round(x * scale), minb, maxb) / scale
    return torch.where(zero, torch.zeros_like(y), y)


def fake_quant_int(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax=None) -> torch.Tensor:
    amax_el = expand_to(amax.float(), x.shape, spec.granularity, spec.block_size)
    return fake_quant_int_elementwise(x, amax_el, spec.fmt)


def search_fold_int(xb: torch.Tensor, cand: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    """The fold of blocks xb [r, nb, bs] under candidate amaxes cand [K, r, nb] (the MSE search's candidates)."""
    amax_el = cand.unsqueeze(-1).expand(-1, -1, -1, xb.shape[-1])
    return fake_quant_int_elementwise(xb.unsqueeze(0).expand_as(amax_el), amax_el, spec.fmt)


_INT_FACTS = dict(granularities=("tensor", "channel", "group"), search_fold=search_fold_int)
register_format(NumericFormat("int8", fake_quant_int, activations=True, modelopt_num_bits=8, **_INT_FACTS))
register_format(NumericFormat("int4", fake_quant_int, modelopt_num_bits=4, **_INT_FACTS))
