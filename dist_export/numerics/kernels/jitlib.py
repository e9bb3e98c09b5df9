"""Device functions shared by the kernels (float32 element arithmetic exactly as the torch reference does it).

Called from stage 2 kernels on every rank. Every float32 division goes through `div_rn` (IEEE round to
nearest: Triton's `/` is an approximate division on the GPU), and the kernels are launched with
`enable_fp_fusion=False` so no multiply-add is contracted into an FMA.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def div_rn(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def e4m3_round(s):
    """float32 s >= 0 (at most 448) -> the float32 value of its E4M3 rounding (nearest, ties to even), as
    torch's `.to(torch.float8_e4m3fn).float()`. Normal range (s >= 2**-6): round the mantissa to 3 bits on the
    bit pattern; subnormal range: round s * 2**9 to an integer with the 2**23 trick (exact for s * 2**9 < 2**22)."""
    bits = s.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    sub = ((s * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
    return tl.where(s >= 0.015625, normal, sub)


@triton.jit
def e4m3_byte(mag, neg):
    """E4M3 code (int32 0..255) of an E4M3-representable float32 magnitude and a sign flag."""
    bits = mag.to(tl.int32, bitcast=True)
    normal = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)
    sub = (mag * 512.0).to(tl.int32)
    code = tl.where(mag >= 0.015625, normal, sub)
    return code | tl.where(neg, 0x80, 0)


@triton.jit
def sign_bit(x):
    """True where float32 x has its sign bit set (also -0.0)."""
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def with_sign(mag, neg):
    """mag (>= +0.0) with its sign bit set where neg: -0.0 too (Triton's unary minus is 0 - x, giving +0.0)."""
    bits = mag.to(tl.int32, bitcast=True) | tl.where(neg, -2147483648, 0)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rint(v):
    """torch.round (nearest, ties to even) of float32 v, sign of zero kept; |v| is first limited to 2**22,
    which changes no result that is later clamped to an integer range inside +-2**22."""
    c = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    r = tl.abs((c + 12582912.0) - 12582912.0)
    return with_sign(r, sign_bit(v))


@triton.jit
def e2m1_index(a):
    """|x|/sq -> E2M1 magnitude code 0..7 by the reference kernel's threshold table (nvfp4.round_e2m1_magnitude)."""
    idx = (a > 0.25).to(tl.int32)
    idx += (a >= 0.75).to(tl.int32)
    idx += (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32)
    idx += (a > 2.5).to(tl.int32)
    idx += (a >= 3.5).to(tl.int32)
    idx += (a > 5.0).to(tl.int32)
    return idx


@triton.jit
def e2m1_code(a):
    """|x|/sq -> E2M1 magnitude code 0..7, equal to `e2m1_index` (the threshold table) for every float32 a >= 0
    and NaN, in fewer operations: a >= 1 rounds its mantissa to one bit on the bit pattern (nearest, ties to
    even: 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, and everything from 7 up, inf too, saturates to
    code 7 = 6.0); a < 1 is the subnormal range, round(2a) by the 2**23 trick (0.25 -> 0, 0.75 -> 1.0); NaN
    passes no threshold and gives 0. The codes follow the value's exponent and mantissa bit: code = bits >> 22
    minus 252 for 1.0 (0x3F800000) up."""
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 22) & 1
    normal = tl.minimum(((bits + 0x1FFFFF + lsb) >> 22) - 252, 7)
    sub = ((a * 2.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(a >= 1.0, normal, tl.where(a < 1.0, sub, 0))


@triton.jit
def e2m1_round(a):
    """|x|/sq -> E2M1 magnitude (float32 0, 0.5, 1, 1.5, 2, 3, 4, 6), equal to e2m1_value(e2m1_index(a)) for
    every float32 a >= 0 and NaN (see e2m1_code), computed on the float: no code, no table."""
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 22) & 1
    normal = tl.minimum(((bits + 0x1FFFFF + lsb) & -4194304).to(tl.float32, bitcast=True), 6.0)
    sub = ((a * 2.0 + 8388608.0) - 8388608.0) * 0.5
    return tl.where(a >= 1.0, normal, tl.where(a < 1.0, sub, 0.0))


@triton.jit
def e2m1_value(idx):
    """E2M1 magnitude (float32) of code 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    small = idx.to(tl.float32) * 0.5  # codes 0..4 -> 0 .. 2
    big = (idx - 2).to(tl.float32)  # codes 5, 6 -> 3, 4
    return tl.where(idx <= 4, small, tl.where(idx == 7, 6.0, big))


@triton.jit
def pair_tree_sum(x, LOG2N: tl.constexpr):
    """Sum a [M, 2**LOG2N] tile along its last dim by adjacent pairs, level by level:
    level 1 adds columns (0,1), (2,3), ...; level 2 adds those sums pairwise, and so on (mse.pairwise_sum)."""
    for _ in tl.static_range(LOG2N):
        a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        x = a + b
    return tl.reshape(x, (x.shape[0],))


@triton.jit
def store_cast(ptr, offs, y, mask, BF16: tl.constexpr):
    """Store float32 y cast once, round to nearest even, to the output's dtype. For bfloat16 (ptr is the
    output viewed as int16) the rounding is written out on the bits: Triton's interpreter truncates instead."""
    if BF16:
        bits = y.to(tl.int32, bitcast=True)
        tl.store(ptr + offs, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)
