"""MXFP4 and MXFP8 (OCP Microscaling Formats v1.0): blocks of 32 along the last dim sharing one power-of-two
scale (E8M0), elements E2M1 (MXFP4) or E4M3 (MXFP8). Pure tensor functions, any device; any rank's execute stage.

Per block with amax a = max|x| (docs/formats-notes.md, "MX"):
    k = floor(log2(a)) - emax   (emax 2 for E2M1, 8 for E4M3; taken from frexp, exact)
    k = -127 where a == 0;  k clamped to [-127, 127] (the E8M0 range; 255 is NaN and never produced)
    X = 2**k;  q = element(clamp(x / X, -max, max)) rounded to nearest, ties to even (E2M1 max 6, E4M3 max 448)
    y = q * X
Dividing by a power of two is exact, so `y` is exactly what a loader computes from the codes and the E8M0 byte
`k + 127`. Elements above the format's max after scaling (a block's amax sits in [2**(k+emax), 2**(k+emax+1)),
so up to 8 for E2M1 and up to 512 for E4M3) saturate to the max, as the OCP reference conversion does.

Registered as the numeric formats "mxfp4" and "mxfp8" (granularity "group", blocks of 32): weights (the recipes
mxfp4-w4a16 and mxfp8-w8a16, exported as fake quant with `--format vllm-fq` or as compressed-tensors'
mxfp4-pack-quantized / mxfp8-quantized) and dynamic inputs (the recipes mxfp4-w4a4 and mxfp8-w8a8, `vllm-fq` only).
"""
from __future__ import annotations

import torch

from .constants import F4E2M1_MAX, F8E4M3_MAX
from .nvfp4 import round_e2m1_magnitude
from .spec import NumericFormat, register_format

MX_BLOCK = 32
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # E8M0 byte = exponent + 127; 255 is NaN
MX_ELEMENTS = {  # name: (emax of the element format, largest magnitude)
    "mxfp4": (2, F4E2M1_MAX),  # E2M1: 6.0 = 1.5 * 2**2
    "mxfp8": (8, F8E4M3_MAX),  # E4M3: 448.0 = 1.75 * 2**8
}


def mx_block_exponent(block_amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """int32 shared exponent k per block (see the module docstring)."""
    emax, _ = MX_ELEMENTS[fmt]
    a = block_amax.float()
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2(a)) = e - 1
    k = e.to(torch.int32) - 1 - emax
    k = torch.where(a > 0, k, torch.full_like(k, E8M0_MIN_EXP))
    return torch.clamp(k, E8M0_MIN_EXP, E8M0_MAX_EXP)


def _round_elements(v: torch.Tensor, fmt: str) -> torch.Tensor:
    _, vmax = MX_ELEMENTS[fmt]
    v = torch.clamp(v, -vmax, vmax)
    if fmt == "mxfp8":
        return v.to(torch.float8_e4m3fn).float()
    q = round_e2m1_magnitude(v.abs())
    return torch.where(v >= 0, q, -q)


def quantize_mx(x: torch.Tensor, fmt: str, block_amax: torch.Tensor | None = None):
    """(elements, k): the element values q (float32, x's shape, each exactly an E2M1 / E4M3 value, signed zeros
    kept) and the int32 shared exponent k per block [..., ceil(cols / 32)], so that the fold is q * 2**k."""
    x = x.float()
    cols = x.shape[-1]
    nblocks = -(-cols // MX_BLOCK)
    pad = nblocks * MX_BLOCK - cols
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    blocks = xp.reshape(*x.shape[:-1], nblocks, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1) if block_amax is None else block_amax.float().reshape(blocks.shape[:-1])
    k = mx_block_exponent(amax, fmt)
    # x * 2**-k is exact (a power of two), done with ldexp so no rounded reciprocal enters
    q = _round_elements(torch.ldexp(blocks, -k.unsqueeze(-1)), fmt)
    return q.reshape(*x.shape[:-1], nblocks * MX_BLOCK)[..., :cols], k


def mx_fake_quant(x: torch.Tensor, fmt: str, block_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Fold of `x` (float32, last dim any length; a short last block is its own block) into MX values."""
    q, k = quantize_mx(x, fmt, block_amax)
    k_el = k.repeat_interleave(MX_BLOCK, dim=-1)[..., : x.shape[-1]]
    return torch.ldexp(q, k_el)  # q * 2**k: exact


def fake_quant_mx(x: torch.Tensor, spec, amax: torch.Tensor, block_amax: torch.Tensor | None = None) -> torch.Tensor:
    """The registered fold: `amax` is the per-block amax (granularity "group", blocks of 32) that the planner's
    max calibration computed; the scales come from it alone (no tensor amax)."""
    return mx_fake_quant(x, spec.fmt, amax if amax.dim() else None)


# Real-quant weight layout: compressed-tensors' MXFP8A16 / MXFP4A16 (output_formats/compressed_tensors.py, from
# `quantize_mx`). As input quantizers (dynamic, blocks of 32; `vllm-fq` only) they are recorded for ModelOpt's
# vLLM fake-quant worker in ModelOpt's own MX settings (its MXFP8/MXFP4_DEFAULT_CFG: `num_bits` E4M3 / E2M1,
# `block_sizes` {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}); the consumer computes those activation scales
# at run time with its own rule (ModelOpt 0.47's CUDA kernel: 2**ceil(log2(amax / max)), not OCP's floor used for
# our weights; tensor_quant_mx.cu compute_scale_e8m0_NV).
_MODELOPT_NUM_BITS = {"mxfp4": (2, 1), "mxfp8": (4, 3)}
MODELOPT_MX_BLOCK_SIZES = {-1: MX_BLOCK, "type": "dynamic", "scale_bits": (8, 0)}
_CPU_REASON = ("MX activation fake quant needs ModelOpt 0.47's CUDA extension modelopt_cuda_ext_mx (it is skipped "
               "without CUDA; needs a GPU)")
for _name in MX_ELEMENTS:
    register_format(NumericFormat(_name, fake_quant_mx, granularities=("group",), block_size=MX_BLOCK,
                                  activations=True, modelopt_num_bits=_MODELOPT_NUM_BITS[_name],
                                  modelopt_block_sizes=MODELOPT_MX_BLOCK_SIZES, cpu_input_reason=_CPU_REASON))
