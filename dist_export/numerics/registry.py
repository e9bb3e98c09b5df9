"""Registry of numeric formats: adding a format adds a module that calls `register_format`, not an if/elif.

Each format supplies pure tensor functions (no I/O, no process group):
  fake_quant(x, spec, amax, block_amax) -> float32 folded values (the caller casts once, RNE, to the weight dtype)
  quantize(x, spec, amax, block_amax)   -> dict of real-quant tensors (qdata and scales), or None if the format
                                           has no real-quant layout here
  dequantize(tensors, spec, shape)      -> float32 values that must equal fake_quant bit for bit
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .blocks import check_finite
from .spec import QuantSpec


@dataclass(frozen=True)
class NumericFormat:
    name: str
    fake_quant: Callable[..., torch.Tensor]
    quantize: Optional[Callable[..., dict]] = None
    dequantize: Optional[Callable[..., torch.Tensor]] = None


_FORMATS: dict[str, NumericFormat] = {}


def register_format(fmt: NumericFormat) -> NumericFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> NumericFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown numeric format {name!r}; valid: {sorted(_FORMATS)}") from None


def fake_quant(
    w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold quantize+dequantize into `w`: fp32 math on w.float(), one RNE cast back to w.dtype."""
    y = get_format(spec.fmt).fake_quant(w.float(), spec, amax.to(w.device), block_amax)
    return y.to(w.dtype)


def fake_quant_f32(
    w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Same as `fake_quant` but returns the float32 values before the final cast (for real-vs-fake checks)."""
    return get_format(spec.fmt).fake_quant(w.float(), spec, amax.to(w.device), block_amax)


def quantize(
    w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax: torch.Tensor | None = None, name: str = "tensor"
) -> dict:
    check_finite(w, name)
    fmt = get_format(spec.fmt)
    if fmt.quantize is None:
        raise ValueError(f"{name}: format {spec.fmt!r} has no real-quant layout")
    return fmt.quantize(w.float(), spec, amax.to(w.device), block_amax)


def dequantize(tensors: dict, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    fmt = get_format(spec.fmt)
    if fmt.dequantize is None:
        raise ValueError(f"format {spec.fmt!r} has no real-quant layout")
    return fmt.dequantize(tensors, spec, shape)
