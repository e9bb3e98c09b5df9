"""Dequantization multipliers for layouts whose loaders multiply where our fold divides (pure tensor functions).

compressed-tensors dequantizes INT codes as `q.to(scale.dtype) * scale` and NVFP4 as
`q * (block_scale / global_scale)`, then casts to the model dtype; our fold (formats.md section 5) computes
`q / s` (INT) and `q * (block_scale * gs)` (NVFP4). These functions choose the stored numbers so that both sides
give the same value in the model dtype, and check it against every code the format has (not only the codes a
tensor happens to use), so a choice depends on the amax alone: weights that share an amax (fused q/k/v,
gate/up) get the same stored scale.
- INT: float64 `1 / s` (see `int_multiplier`).
- NVFP4: the float32 global scale `1 / gs` or the nearest of its float32 neighbours that reproduces every
  (E2M1 value, E4M3 block scale) product (see `nvfp4_global_scale`).

Run by: the rank that quantizes an item (CPU or its GPU), inside the output format's `produce`.
"""
from __future__ import annotations

import torch

from .constants import AMAX_TINY, NVFP4_SQ_FLOOR
from .nvfp4 import E2M1_VALUES

# float32 neighbours of 1/gs tried after it, nearest first (ulp steps).
NEIGHBOUR_STEPS = (0, 1, -1, 2, -2, 3, -3, 4, -4)


def ulp_step(x: torch.Tensor, k: int) -> torch.Tensor:
    """x moved by k float32 ulps (x positive and finite)."""
    return (x.float().contiguous().view(torch.int32) + k).view(torch.float32)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor as integers (so -0.0 and +0.0, and NaN payloads, compare as stored)."""
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def int_divisor(amax: torch.Tensor, maxb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, zero) as the INT fold computes them per amax element: s = maxb / amax (true division), amax 0 -> 1."""
    a = amax.float()
    zero = a <= AMAX_TINY
    safe = torch.where(zero, torch.ones_like(a), a)
    return torch.full_like(safe, maxb) / safe, zero


def int_multiplier(amax: torch.Tensor, maxb: float, minb: float, out_dtype: torch.dtype):
    """Per amax element, the float64 multiplier c = 1 / s (s the fold's float32 divisor, true division in double
    precision) and whether out_dtype(float64(q) * c) == out_dtype(q / s) holds for every code q in [minb, maxb].

    Float32 multipliers cannot do this in general: for a float32 model `q * c` equals `q / s` for every code only
    where c is exactly 1/s (about 37% of INT4 and 3% of INT8 groups), and even rounded to bfloat16 about 1e-5 of
    INT8 channels have no float32 c at all (measured over 1e6 amax values). In double precision the product is
    within 2**-52 of q / s and rounds (through float32, as torch casts double) to the fold's value; the check
    proves it per group. Groups of amax 0 fold to zeros: found."""
    s, zero = int_divisor(amax, maxb)
    c = torch.ones_like(s, dtype=torch.float64) / s.double()
    codes = torch.arange(minb, maxb + 1, dtype=torch.float64, device=s.device)
    want = _bits((codes.float() / s.unsqueeze(-1)).to(out_dtype))
    got = _bits((codes * c.unsqueeze(-1)).to(out_dtype))
    return c, (got == want).all(dim=-1) | zero


def e4m3_positive_values(device=None) -> torch.Tensor:
    """Every positive finite float8_e4m3fn value, ascending, as float32."""
    v = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v) & (v > 0)].unique()


def nvfp4_global_scale(gs: torch.Tensor, out_dtype: torch.dtype):
    """The float32 global scale G (compressed-tensors' convention: block multiplier = block_scale / G) for which
    out_dtype(q * float32(s / G)) == out_dtype(q * float32(s * gs)) for every E2M1 magnitude q and every E4M3
    block scale s that the fold does not replace by its 1.0 quirk (those blocks fold to zeros). Returns (G, found)."""
    g = gs.float().reshape(())
    s = e4m3_positive_values(g.device)
    s = s[s * g >= NVFP4_SQ_FLOOR]
    q = torch.tensor(E2M1_VALUES[1:], dtype=torch.float32, device=g.device)
    target = _bits((q * (s * g).unsqueeze(-1)).to(out_dtype))
    G0 = torch.ones_like(g) / g
    for k in NEIGHBOUR_STEPS:
        G = ulp_step(G0, k)
        if bool((_bits((q * (s / G).unsqueeze(-1)).to(out_dtype)) == target).all()):
            return G, True
    return G0, False
