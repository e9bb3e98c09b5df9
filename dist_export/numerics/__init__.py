"""Quantization numerics: pure tensor functions, bit-exact with formats.md section 5 on CPU and CUDA.

Pure functions: called on every rank in the execute stage (and by verify, one process).
"""
from . import fp8, integer, mx, nvfp4  # noqa: F401  (registers the formats)
from .kernels import formats as _kernel_formats  # noqa: F401  (attaches each format's GPU kernels)
from .blocks import check_finite, expand_to, reduce_abs_max
from .registry import compute_amax, dequantize, fake_quant, get_format, has_tensor_amax, quantize
from .spec import QuantSpec

__all__ = [
    "QuantSpec",
    "check_finite",
    "compute_amax",
    "dequantize",
    "expand_to",
    "fake_quant",
    "get_format",
    "has_tensor_amax",
    "quantize",
    "reduce_abs_max",
]
