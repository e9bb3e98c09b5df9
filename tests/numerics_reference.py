"""Independent reference for the quantization arithmetic of docs/formats.md (sections 4 and 5).

Written from formats.md only (not from dist_export.numerics), in a deliberately plain style:

* per-block amax is computed with explicit Python loops over slices of the weight (a slice that runs past the end
  of a dimension is simply shorter, which is the same as "zero-pad, zeros never raise the max");
* the block amax is then broadcast back to one value per element ("amax map"), and the elementwise formula of
  formats.md section 5 is applied with torch ops on fp32 values;
* a single round-to-nearest-even cast to the weight dtype happens at the very end (torch ``Tensor.to`` is RNE).

Granularities (weights are 2-D ``[out, in]``):

* ``tensor``  -> amax shape ``[]``
* ``channel`` -> amax shape ``[out, 1]`` (axis 0)
* ``group``   -> amax shape ``[out, ceil(in / g)]`` (runs of ``g`` along the last dim)
* ``block``   -> amax shape ``[ceil(out / b), ceil(in / b)]`` (square 2-D blocks)
* ``nvfp4``   -> the amax *argument* is the global tensor amax, shape ``[]``; the 16-element block maxima are
  computed inside :func:`ref_fake_quant`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "E2M1_VALUES",
    "FP8_MAX",
    "TINY_AMAX",
    "block_dims",
    "ref_compute_amax",
    "ref_fake_quant",
    "ref_fp8",
    "ref_int",
    "ref_nvfp4",
    "e2m1_round",
    "e4m3_rne_by_table",
    "ref_nvfp4_real_quant",
    "ref_nvfp4_dequant",
    "pack_e2m1_codes",
    "unpack_e2m1_codes",
]

FP8_MAX = 448.0
TINY_AMAX = 2.0 ** -24  # "a <= 2**-24": amax treated as zero
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 code 0..7 (code | 8 is the negative value)
NVFP4_BLOCK = 16


# --------------------------------------------------------------------------------------------------------------
# Block geometry and amax
# --------------------------------------------------------------------------------------------------------------
def block_dims(fmt: str, granularity: str, block_size, shape) -> tuple[int, int]:
    """(rows per block, columns per block) for a 2-D weight of ``shape``."""
    out, inn = shape
    if fmt == "nvfp4":
        return 1, NVFP4_BLOCK
    if granularity == "tensor":
        return out, inn
    if granularity == "channel":
        return 1, inn
    if granularity == "group":
        return 1, int(block_size)
    if granularity == "block":
        return int(block_size), int(block_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def _block_amax_loop(w32: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """max|w| of every (br x bc) block, by explicit loops. Shape [ceil(out/br), ceil(in/bc)], float32."""
    out, inn = w32.shape
    nr, nc = math.ceil(out / br), math.ceil(inn / bc)
    res = torch.zeros(nr, nc, dtype=torch.float32)
    if br == 1:  # one block per row and column slice: loop over the column slices only (same result, faster)
        for j in range(nc):
            res[:, j] = w32[:, j * bc:(j + 1) * bc].abs().amax(dim=1)
        return res
    for i in range(nr):
        for j in range(nc):
            blk = w32[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            res[i, j] = blk.abs().max()
    return res


def _expand(amax_blocks: torch.Tensor, br: int, bc: int, shape) -> torch.Tensor:
    """Broadcast a per-block amax back to one value per element (repeat each block value, crop)."""
    out, inn = shape
    return amax_blocks.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[:out, :inn].contiguous()


def ref_compute_amax(w: torch.Tensor, fmt: str, granularity: str, block_size=None) -> torch.Tensor:
    """Reference of ``compute_amax``: float32 max|W| at the spec's granularity (see module docstring for shapes)."""
    assert w.dim() == 2, "reference handles 2-D weights"
    w32 = w.float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("weight contains NaN or inf")
    if fmt == "nvfp4" or granularity == "tensor":
        return w32.abs().max().reshape(())
    if granularity == "channel":
        return _block_amax_loop(w32, 1, w32.shape[1])  # [out, 1]
    br, bc = block_dims(fmt, granularity, block_size, w32.shape)
    return _block_amax_loop(w32, br, bc)


def _amax_map(w32: torch.Tensor, fmt: str, granularity: str, block_size, amax: torch.Tensor) -> torch.Tensor:
    """amax (as given, in its granularity's shape) broadcast to one fp32 value per element of w."""
    a = amax.float()
    if granularity == "tensor":
        assert a.numel() == 1
        return a.reshape(()).expand(w32.shape)
    if granularity == "channel":
        assert tuple(a.shape) == (w32.shape[0], 1), a.shape
        return a.expand(w32.shape)
    br, bc = block_dims(fmt, granularity, block_size, w32.shape)
    assert tuple(a.shape) == (math.ceil(w32.shape[0] / br), math.ceil(w32.shape[1] / bc)), a.shape
    return _expand(a, br, bc, w32.shape)


# --------------------------------------------------------------------------------------------------------------
# Elementwise formulas (formats.md section 5), all on fp32 tensors of equal shape
# --------------------------------------------------------------------------------------------------------------
def div32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 division a / b (IEEE 754): divide in float64, round once to float32.
    (float64 has 53 >= 2*24 + 2 bits, so this double rounding is innocuous for division.)"""
    return (a.double() / b.double()).float()


def _scalar_over(c: float, a: torch.Tensor, rdiv: str) -> torch.Tensor:
    """fp32 value of ``c / a`` for a constant c (formats.md: 'scale = 448.0 / a', 'float32(maxb) / amax').

    "ieee" (the reference): the correctly rounded fp32 quotient.
    "torch_scalar" (diagnostic only): what the literal torch expression ``c / a`` with a Python float on the left
    computes: Tensor.__rtruediv__ is ``a.reciprocal() * c``, two roundings, which differs from the IEEE quotient
    in about a quarter of the cases."""
    if rdiv == "ieee":
        return div32(torch.full_like(a, c), a)
    if rdiv == "torch_scalar":
        return a.reciprocal() * c
    raise ValueError(rdiv)


def ref_fp8(x: torch.Tensor, amax_map: torch.Tensor, rdiv: str = "ieee") -> torch.Tensor:
    """FP8 E4M3:  a = amax (1.0 where a <= 2**-24); scale = 448/a; inv = 1/scale;
    y = float8_e4m3fn(clamp(x*scale, -448, 448)).float() * inv       (fp32 result)."""
    a = amax_map.float()
    a = torch.where(a <= TINY_AMAX, torch.ones_like(a), a)
    scale = _scalar_over(FP8_MAX, a, rdiv)
    inv = div32(torch.ones_like(scale), scale)
    q = torch.clamp(x * scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q * inv


def ref_int(x: torch.Tensor, amax_map: torch.Tensor, bits: int, rdiv: str = "ieee") -> torch.Tensor:
    """INT symmetric, full range (minb = -maxb-1):  scale = float32(maxb)/amax;
    y = clamp(round_half_even(x*scale), minb, maxb) / scale;  y = 0 where amax <= 2**-24."""
    maxb = 2 ** (bits - 1) - 1
    minb = -maxb - 1
    a = amax_map.float()
    scale = _scalar_over(float(maxb), a, rdiv)  # inf where a == 0 (masked below)
    q = torch.clamp(torch.round(x * scale), minb, maxb)  # torch.round is round-half-to-even
    y = div32(q, scale)
    return torch.where(a <= TINY_AMAX, torch.zeros_like(y), y)


def e2m1_round(a: torch.Tensor) -> torch.Tensor:
    """|x|/sq -> E2M1 magnitude, the exact threshold table of formats.md:
    0 if a<=0.25 | 0.5 if a<0.75 | 1 if a<=1.25 | 1.5 if a<1.75 | 2 if a<=2.5 | 3 if a<3.5 | 4 if a<=5 | 6."""
    q = torch.full_like(a, 6.0)
    # Assign from the top down so that the smallest matching bucket wins.
    q = torch.where(a <= 5.0, torch.full_like(a, 4.0), q)
    q = torch.where(a < 3.5, torch.full_like(a, 3.0), q)
    q = torch.where(a <= 2.5, torch.full_like(a, 2.0), q)
    q = torch.where(a < 1.75, torch.full_like(a, 1.5), q)
    q = torch.where(a <= 1.25, torch.full_like(a, 1.0), q)
    q = torch.where(a < 0.75, torch.full_like(a, 0.5), q)
    q = torch.where(a <= 0.25, torch.zeros_like(a), q)
    return q


def _nvfp4_gs(gamax: torch.Tensor) -> torch.Tensor:
    gs = div32(gamax.float().reshape(()), torch.tensor(6.0 * 448.0))
    return torch.where(gs <= 0, torch.tensor(1e-12, dtype=torch.float32), gs)


def ref_nvfp4(x: torch.Tensor, gamax: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quant (formats.md section 5), x fp32 [out, in], gamax the global amax (shape [])."""
    gs = _nvfp4_gs(gamax)
    bmax = _expand(_block_amax_loop(x, 1, NVFP4_BLOCK), 1, NVFP4_BLOCK, x.shape)
    s = torch.clamp(div32(bmax, 6.0 * gs), max=448.0)  # min(bmax / (6*gs), 448); 6*gs computed first
    sq = s.to(torch.float8_e4m3fn).float() * gs  # RNE; s <= 448 so saturation never matters
    # "sq = 1.0 if sq < 1e-5": compared in fp32 (torch compares an fp32 tensor with a Python scalar in fp32,
    # as a GPU kernel comparing with the float literal 1e-5f would).
    sq = torch.where(sq < torch.tensor(1e-5, dtype=torch.float32), torch.ones_like(sq), sq)
    a = div32(x.abs(), sq)
    q = e2m1_round(a)
    # sign(x) with sign(+-0) = +0 (mathematical sign): an input -0.0 yields +0.0, a negative input whose
    # magnitude rounds to 0 yields (-1) * 0 = -0.0.
    sgn = torch.where(x > 0, torch.ones_like(x), torch.where(x < 0, -torch.ones_like(x), torch.zeros_like(x)))
    return sgn * q * sq


def ref_fake_quant(
    w: torch.Tensor, fmt: str, granularity: str, block_size, amax: torch.Tensor, rdiv: str = "ieee"
) -> torch.Tensor:
    """Reference of ``fake_quant``: fp32 math on w.float(), one RNE cast to w.dtype at the end.

    ``rdiv="torch_scalar"`` is a diagnostic variant only (see :func:`_scalar_over`)."""
    x = w.float()
    if fmt == "nvfp4":
        assert granularity == "group" and block_size == NVFP4_BLOCK
        y = ref_nvfp4(x, amax)
    else:
        am = _amax_map(x, fmt, granularity, block_size, amax)
        if fmt == "fp8":
            y = ref_fp8(x, am, rdiv)
        elif fmt == "int8":
            y = ref_int(x, am, 8, rdiv)
        elif fmt == "int4":
            y = ref_int(x, am, 4, rdiv)
        else:
            raise ValueError(fmt)
    return y.to(w.dtype)


# --------------------------------------------------------------------------------------------------------------
# Helpers used to check the reference itself
# --------------------------------------------------------------------------------------------------------------
def _e4m3_positive_values() -> list[float]:
    """All finite non-negative float8_e4m3fn values in code order (bias 7, no inf, S.1111.111 is NaN)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            if e == 0:
                vals.append(m / 8.0 * 2.0 ** -6)
            else:
                vals.append((1.0 + m / 8.0) * 2.0 ** (e - 7))
    return vals


def e4m3_rne_by_table(x: float) -> float:
    """Round a float in [0, 448] to E4M3 with ties to even, by table lookup in float64 (checks torch's cast)."""
    vals = _e4m3_positive_values()
    best_i = min(range(len(vals)), key=lambda i: (abs(vals[i] - x), i % 2))  # tie -> even mantissa (code)
    return vals[best_i]


# --------------------------------------------------------------------------------------------------------------
# Section 4: NVFP4 real-quant layout (reference helpers; formats.md leaves the exact real-quant rule to the
# implementation, so these follow the literal section-4 text and are only used for self-checks)
# --------------------------------------------------------------------------------------------------------------
def e2m1_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8 0..15, bit 3 = sign) of x/scale, using the threshold table."""
    q = e2m1_round(x.abs() / scale)
    mag = torch.zeros_like(q, dtype=torch.uint8)
    for code, v in enumerate(E2M1_VALUES):
        mag = torch.where(q == v, torch.tensor(code, dtype=torch.uint8), mag)
    neg = (x < 0) & (mag != 0)
    return torch.where(neg, mag | 8, mag).to(torch.uint8)


def pack_e2m1_codes(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> U8 [N, K/2]: two codes per byte, low nibble = even column (formats.md section 4)."""
    assert codes.shape[-1] % 2 == 0
    lo = codes[..., 0::2].to(torch.uint8)
    hi = codes[..., 1::2].to(torch.uint8)
    return lo | (hi << 4)


def unpack_e2m1_codes(packed: torch.Tensor) -> torch.Tensor:
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_code_values(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=torch.float32)
    return table[codes.long()]


def ref_nvfp4_real_quant(w: torch.Tensor, gamax: torch.Tensor):
    """Literal section-4 real quant: weight_scale_2 = amax/2688; block scale
    clamp(bmax/(6*weight_scale_2), 2**-9, 448) (zero -> 1.0 first) cast to E4M3; codes of
    x / (scale_e4m3 * weight_scale_2). Returns (packed U8 [N, K/2], weight_scale F8 [N, K/16], weight_scale_2 [])."""
    x = w.float()
    n, k = x.shape
    assert k % NVFP4_BLOCK == 0
    ws2 = gamax.float().reshape(()) / 2688.0
    bmax = _block_amax_loop(x, 1, NVFP4_BLOCK)  # [N, K/16]
    s = bmax / (6.0 * ws2)
    s = torch.where(s == 0, torch.ones_like(s), s)
    s = torch.clamp(s, 2.0 ** -9, 448.0).to(torch.float8_e4m3fn)
    step = _expand(s.float() * ws2, 1, NVFP4_BLOCK, x.shape)
    codes = e2m1_codes(x, step)
    return pack_e2m1_codes(codes), s, ws2


def ref_nvfp4_dequant(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor):
    """value(code) * (float(scale_e4m3) * weight_scale_2), block-expanded (fp32)."""
    codes = unpack_e2m1_codes(packed)
    step = _expand(weight_scale.float() * weight_scale_2.float(), 1, NVFP4_BLOCK, codes.shape)
    return e2m1_code_values(codes) * step
