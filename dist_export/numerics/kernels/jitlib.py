"""Device functions shared by the kernels (float32 element arithmetic exactly as the torch reference does it).

Called from stage 2 kernels on every rank. Every float32 division is IEEE round to nearest (Triton's `/` is
an approximate division on the GPU): `div_rn`, or `div_by` for many elements over one divisor (its reciprocal
once, then explicit fused multiply-adds giving the same bits), and the kernels are launched with
`enable_fp_fusion=False` so no other multiply-add is contracted into an FMA.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter evaluates tl.fma as a product and a sum, each rounded: fma_rn emulates the fused operation
# there (read when the kernels are first imported, as the interpreter switch itself).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def div_rn(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def fma_rn(a, b, c):
    """float32 a * b + c rounded once (IEEE fused multiply-add; the GPU's fma.rn.f32). In the interpreter: the
    product is exact in float64, the float64 sum is made round-to-odd (TwoSum error, last bit forced odd when
    inexact), and its float32 rounding is then the single rounding of the exact value (53 >= 24 + 2 bits)."""
    if INTERPRETED:
        p = a.to(tl.float64) * b.to(tl.float64)
        cd = c.to(tl.float64)
        s = p + cd
        v = s - p
        err = (p - (s - v)) + (cd - v)
        bits = s.to(tl.int64, bitcast=True)
        step = tl.where((err > 0) == (s > 0), 1, -1).to(tl.int64)
        bits = tl.where((err != 0) & ((bits & 1) == 0), bits + step, bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def divisor_parts(b):
    """Per divisor b (a positive normal float32 below 2**127): (m, y, inv_p2) with b = m * 2**k, m in [1, 2)
    b's significand, y = RN(1 / m) (an IEEE division, once per divisor) and inv_p2 = 2**-k, for `div_by`."""
    bits = b.to(tl.int32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    inv_p2 = (0x7F000000 - (bits & 0x7F800000)).to(tl.float32, bitcast=True)
    return m, div_rn(1.0 + tl.zeros_like(m), m), inv_p2


@triton.jit
def div_by(a, m, y, inv_p2):
    """RN(a / b), bit for bit the IEEE division, for float32 a and b = m * 2**k from `divisor_parts` (a zero a
    gives +0.0 whatever its sign: a caller that keeps -0.0 selects a itself there),
    with multiplications and fused multiply-adds only (no reciprocal unit, no branch per element):
      q0 = a * y;  q1 = RN(q0 + y * RN(a - m q0))  (one Newton step: within ~2**-24 ulp of a/m before its
      rounding, so q1 is faithful, one of the two floats around a/m);  q2 = RN(q1 + y * (a - m q1)) is RN(a/m)
      by Markstein's theorem (y within half an ulp of 1/m, q1 faithful; a - m q1 is then exact); q2 * 2**-k is
      RN(a/b) exactly (a power-of-two scaling; it overflows to inf exactly where the division does).
    Needs a/m and the residuals in float32's normal range: a/m in [2**-100, 2**127) covers every use here; for
    smaller a/m (code 0 / value 0 in every caller) the result is still within a few ulps and tiny."""
    q = a * y
    q = fma_rn(fma_rn(-m, q, a), y, q)
    q = fma_rn(fma_rn(-m, q, a), y, q)
    return q * inv_p2


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
def rint_clamped(v, lo, hi):
    """clamp(torch.round(v), lo, hi) (nearest, ties to even, sign of zero kept) for integers lo <= hi within
    +-2**22, computed as round(clamp(v, lo, hi)): rounding is monotone and keeps integers, so clamping first to
    integer bounds gives the same value, and the clamped value is small enough for the 2**23 trick as it is."""
    c = tl.minimum(tl.maximum(v, lo), hi)
    return with_sign(tl.abs((c + 12582912.0) - 12582912.0), sign_bit(c))


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
