"""Fold (fake quant) and real-quant encoder kernels (stage 2, every rank): one pass over a 2-D weight.

Each element reads its amax through a block map: element (r, c) uses entry (r // BR) * SSR + (c // BC) * SSB of
the small per-granularity amax tensor (BR = BC = WHOLE and strides 0 for one value per tensor, BC = WHOLE for one
per row), so one kernel serves the tensor, channel, group and 2-D block granularities. The per-block scales are
computed in the kernel from that amax, with the reference's IEEE operations (`fp8.choose_fp8_inv_scale`,
`integer.fake_quant_int_elementwise`, `nvfp4.global_scale` / `block_multipliers`), instead of a separate chain of
small torch kernels; the FP8 encoder writes the dequant multiplier `inv` of each block from the program that holds
the block's first element, the NVFP4 encoder the global scale from program (0, 0). The float32 element arithmetic
is the reference's (`fp8.py`, `integer.py`, `nvfp4.py`); a fold's result is cast once (round to nearest even) to
the output dtype, as `registry.fake_quant` does.

Launch choices (none changes a value): offsets are int32 where every offset of the launch fits (WIDE=False),
int64 otherwise; a tile is unmasked where the shape divides it (EVEN) and masked only at ragged edges otherwise.
The NVFP4 encoder reads the weight as words of two elements (int32 for 16-bit dtypes, int64 for float32), so the
two E2M1 codes of an output byte are in the same thread: it packs them in registers and stores the bytes, the E4M3
block scales and its flag in the same pass, with no reshape or layout conversion.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jitlib import (div_by, div_rn, divisor_parts, e2m1_code, e2m1_round, e4m3_byte, e4m3_round, rint_clamped,
                     sign_bit, store_cast, with_sign)

_OPTS = {"enable_fp_fusion": False}
TILE_R, TILE_C = 16, 128  # rows x columns per program (FP8, INT): 2048 elements
WHOLE = 1 << 30  # block extent of "one value for all rows / columns"
INT32_LIMIT = 2**31


@triton.jit
def _row_offset(r, stride, WIDE: tl.constexpr):
    if WIDE:
        return r.to(tl.int64) * stride
    else:
        return r * stride


@triton.jit
def _load(ptr, m, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=m, other=0)


@triton.jit
def _store(ptr, v, m, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr, v)
    else:
        tl.store(ptr, v, mask=m)


@triton.jit
def _fold_store(ptr, offs, y, m, BF16: tl.constexpr, EVEN: tl.constexpr):
    if EVEN:
        store_cast(ptr, offs, y, None, BF16)
    else:
        store_cast(ptr, offs, y, m, BF16)


@triton.jit
def _chunk_tile(R, C, TR: tl.constexpr, NBT: tl.constexpr, CB: tl.constexpr, CH: tl.constexpr):
    """A tile of TR rows x NBT column chunks of CB elements (padded to CH, a power of two): element (r, b, j) is
    column b * CB + j. Every element of a chunk has the same per-block amax, so it is loaded (and its scales
    computed) once per (row, chunk) as a small [TR, NBT] tensor instead of once per element."""
    rr = tl.program_id(0) * TR + tl.arange(0, TR)
    bb = tl.program_id(1) * NBT + tl.arange(0, NBT)
    j = tl.arange(0, CH)[None, None, :]
    r = rr[:, None, None]
    col = bb[None, :, None] * CB + j
    m = (r < R) & (col < C) & (j < CB)
    return rr, bb, r, col, m


@triton.jit
def _chunk_amax(ptr, rr, bb, R, C, SSR, SSB, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr,
                TR: tl.constexpr):
    """(amax of every (row, chunk) of the tile [TR, NBT] as float32, its index in the amax tensor, in range).
    Where the block height is a multiple of the tile's (2-D blocks of 128 rows, tiles of 16), every row of the
    tile has the same block row: the amax is loaded (and its scales computed) once per chunk, [1, NBT]."""
    c0 = bb[None, :] * CB
    if BR % TR == 0:
        r0 = tl.program_id(0) * TR
        idx = (r0 // BR) * SSR + (c0 // BC) * SSB
        ok = (r0 < R) & (c0 < C)
    else:
        idx = (rr[:, None] // BR) * SSR + (c0 // BC) * SSB
        ok = (rr[:, None] < R) & (c0 < C)
    return tl.load(ptr + idx, mask=ok, other=1.0).to(tl.float32), idx, ok


@triton.jit
def _fp8_scale(a):
    """fp8.choose_fp8_inv_scale of float32 a: (scale = 448 / a, inv = 1 / scale), a = 1 where a <= 2**-24."""
    a = tl.where(a <= 5.960464477539063e-08, 1.0, a)
    scale = div_rn(448.0 + tl.zeros_like(a), a)
    return scale, div_rn(1.0 + tl.zeros_like(a), scale)


@triton.jit
def _fp8_kernel(x_ptr, amax_ptr, y_ptr, inv_ptr, R, C, sx, sy, SSR, SSB, BR: tl.constexpr, BC: tl.constexpr,
                FAKE: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr, NBT: tl.constexpr, CB: tl.constexpr,
                CH: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr, SCALAR: tl.constexpr):
    """y_ptr: the fold (FAKE) or the E4M3 codes; the encoder stores inv of each block from the (row, chunk)
    holding the block's first element. SCALAR: one amax for the tensor, its scales computed once per program."""
    rr, bb, r, col, m = _chunk_tile(R, C, TR, NBT, CB, CH)
    x = _load(x_ptr + _row_offset(r, sx, WIDE) + col, m, EVEN).to(tl.float32)
    if SCALAR:
        scale, inv = _fp8_scale(tl.load(amax_ptr).to(tl.float32))
        scale_el, inv_el = scale, inv
    else:
        a, idx, ok = _chunk_amax(amax_ptr, rr, bb, R, C, SSR, SSB, BR, BC, CB, TR)
        scale, inv = _fp8_scale(a)
        scale_el, inv_el = scale[:, :, None], inv[:, :, None]
    v = tl.minimum(tl.maximum(x * scale_el, -448.0), 448.0)
    mag = e4m3_round(tl.abs(v))
    neg = sign_bit(v)
    if FAKE:
        y = with_sign(mag, neg) * inv_el
        _fold_store(y_ptr, _row_offset(r, sy, WIDE) + col, y, m, BF16, EVEN)
    else:
        _store(y_ptr + _row_offset(r, sy, WIDE) + col, e4m3_byte(mag, neg).to(tl.uint8), m, EVEN)
        if SCALAR:
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(inv_ptr, inv)
        else:
            first = ok & ((bb[None, :] * CB) % BC == 0)
            if BR % TR == 0:
                first = first & ((tl.program_id(0) * TR) % BR == 0)
            else:
                first = first & (rr[:, None] % BR == 0)
            tl.store(inv_ptr + idx, inv, mask=first)


@triton.jit
def _int_scale(a, MAXB):
    """(scale = maxb / a (true division, a = 1 where a <= 2**-24), the blocks that fold to zeros)."""
    zero = a <= 5.960464477539063e-08
    return div_rn(MAXB + tl.zeros_like(a), tl.where(zero, 1.0, a)), zero


@triton.jit
def _int_kernel(x_ptr, amax_ptr, y_ptr, R, C, sx, sy, SSR, SSB, MAXB, MINB, BC: tl.constexpr,
                BF16: tl.constexpr, TR: tl.constexpr, NBT: tl.constexpr, CB: tl.constexpr, CH: tl.constexpr,
                EVEN: tl.constexpr, WIDE: tl.constexpr, SCALAR: tl.constexpr):
    """integer.fake_quant_int per block: v / scale per element by `div_by` (the divisor's reciprocal once per
    (row, chunk)). SCALAR: one amax for the tensor."""
    rr, bb, r, col, m = _chunk_tile(R, C, TR, NBT, CB, CH)
    x = _load(x_ptr + _row_offset(r, sx, WIDE) + col, m, EVEN).to(tl.float32)
    if SCALAR:
        scale, zero = _int_scale(tl.load(amax_ptr).to(tl.float32), MAXB)
        dm, rcp, ip2 = divisor_parts(scale)
    else:
        a, _, _ = _chunk_amax(amax_ptr, rr, bb, R, C, SSR, SSB, 1, BC, CB, TR)
        scale, zero = _int_scale(a, MAXB)
        dm, rcp, ip2 = divisor_parts(scale)
        scale, zero, dm, rcp, ip2 = scale[:, :, None], zero[:, :, None], dm[:, :, None], rcp[:, :, None], ip2[:, :, None]
    v = rint_clamped(x * scale, MINB, MAXB)
    y = tl.where(zero, 0.0, tl.where(v == 0.0, v, div_by(v, dm, rcp, ip2)))  # v / scale; -0.0 stays -0.0
    _fold_store(y_ptr, _row_offset(r, sy, WIDE) + col, y, m, BF16, EVEN)


@triton.jit
def _global_scale(gamax_ptr):
    """nvfp4.global_scale: gamax / 2688 (true division), 1e-12 where that is <= 0."""
    gs = div_rn(tl.load(gamax_ptr).to(tl.float32), 2688.0)
    return tl.where(gs <= 0.0, 1e-12, gs)


@triton.jit
def _nvfp4_block_scales(bmax, gs):
    """nvfp4.block_multipliers: (e4m3 block scale, sq the fold multiplies by, the 1.0-quirk blocks)."""
    s_e4m3 = e4m3_round(tl.minimum(div_rn(bmax, 6.0 * gs), 448.0))
    sq = s_e4m3 * gs
    quirk = sq < 1e-5
    return s_e4m3, tl.where(quirk, 1.0, sq), quirk


@triton.jit
def _nvfp4_fold_kernel(x_ptr, gamax_ptr, bamax_ptr, y_ptr, R, C, sx, sy, NB, HAS_BAMAX: tl.constexpr,
                       BF16: tl.constexpr, TR: tl.constexpr, TB: tl.constexpr, EVEN: tl.constexpr,
                       WIDE: tl.constexpr):
    """Tile of TR rows x TB blocks of 16; element arithmetic of nvfp4.block_scales/_signed_q."""
    rr = tl.program_id(0) * TR + tl.arange(0, TR)
    bb = tl.program_id(1) * TB + tl.arange(0, TB)
    r = rr[:, None, None]
    col = bb[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    m = (r < R) & (col < C)
    x = _load(x_ptr + _row_offset(r, sx, WIDE) + col, m, EVEN).to(tl.float32)
    ax = tl.abs(x)
    if HAS_BAMAX:
        bmask = (rr[:, None] < R) & (bb[None, :] < NB)
        bmax = _load(bamax_ptr + _row_offset(rr[:, None], NB, WIDE) + bb[None, :], bmask, EVEN)
    else:
        bmax = tl.max(ax, axis=2)
    gs = _global_scale(gamax_ptr)
    _, sq, _ = _nvfp4_block_scales(bmax, gs)
    dm, rcp, ip2 = divisor_parts(sq)
    sq = sq[:, :, None]
    # where(x >= 0, q, -q): -0.0 gives +0.0; a negative x rounding to 0 keeps the sign
    y = with_sign(e2m1_round(div_by(ax, dm[:, :, None], rcp[:, :, None], ip2[:, :, None])), x < 0) * sq
    _fold_store(y_ptr, _row_offset(r, sy, WIDE) + col, y, m, BF16, EVEN)


@triton.jit
def _word_halves(w, DT: tl.constexpr):
    """(even, odd) elements, as float32, of words holding two elements each (little-endian: the even element in
    the low half). DT 0: bfloat16 in int32 words, 1: float16 in int32 words, 2: float32 in int64 words."""
    if DT == 0:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    elif DT == 1:
        lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = w.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _e2m1_signed_code(x, ax, m, rcp, ip2):
    """4-bit code of x (sign bit 8 where x < 0, as nvfp4.encode_e2m1 of where(x >= 0, q, -q)) and the magnitude
    code, of |x| / sq (sq = m * 2**k, see `div_by`)."""
    idx = e2m1_code(div_by(ax, m, rcp, ip2))
    return idx | tl.where(x < 0, 8, 0), idx


@triton.jit
def _word_join(lo, hi, DT: tl.constexpr):
    """Words of two float32 values each cast once, round to nearest even, to the weight's dtype (the layout
    `_word_halves` reads; bfloat16 rounded on the bits as `store_cast` does)."""
    if DT == 0:
        lb = lo.to(tl.int32, bitcast=True)
        hb = hi.to(tl.int32, bitcast=True)
        l16 = (lb + 0x7FFF + ((lb >> 16) & 1)) >> 16
        h16 = (hb + 0x7FFF + ((hb >> 16) & 1)) >> 16
        return (l16 & 0xFFFF) | (h16 << 16)
    elif DT == 1:
        l16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return l16 | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
    else:
        l32 = lo.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        return l32 | (hi.to(tl.int32, bitcast=True).to(tl.int64) << 32)


@triton.jit
def _nvfp4_word_kernel(w_ptr, gamax_ptr, bamax_ptr, y_ptr, scale_ptr, gs_ptr, bad_ptr, R, W, sw, sy, NB,
                       HAS_BAMAX: tl.constexpr, DT: tl.constexpr, FAKE: tl.constexpr, TR: tl.constexpr,
                       TB: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr):
    """Tile of TR rows x TB blocks of 16 elements, read as 8 words of two elements (W words per row, row stride
    sw words); each thread holds whole blocks. FAKE: the fold, written as words of the weight's dtype (row stride
    sy words); else the encoder: word k of a row becomes packed byte k (low nibble: the even element's code),
    plus the E4M3 block scales, the global scale (program (0, 0)) and the flag."""
    rr = tl.program_id(0) * TR + tl.arange(0, TR)
    bb = tl.program_id(1) * TB + tl.arange(0, TB)
    r = rr[:, None, None]
    wc = bb[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    m = (r < R) & (wc < W)
    lo, hi = _word_halves(_load(w_ptr + _row_offset(r, sw, WIDE) + wc, m, EVEN), DT)
    alo, ahi = tl.abs(lo), tl.abs(hi)
    bmask = (rr[:, None] < R) & (bb[None, :] < NB)
    if HAS_BAMAX:
        bmax = _load(bamax_ptr + _row_offset(rr[:, None], NB, WIDE) + bb[None, :], bmask, EVEN)
    else:
        bmax = tl.max(tl.maximum(alo, ahi), axis=2)
    gs = _global_scale(gamax_ptr)
    s_e4m3, sq, quirk = _nvfp4_block_scales(bmax, gs)
    dm, rcp, ip2 = divisor_parts(sq)
    dm, rcp, ip2 = dm[:, :, None], rcp[:, :, None], ip2[:, :, None]
    if FAKE:  # where(x >= 0, q, -q) * sq: -0.0 gives +0.0; a negative x rounding to 0 keeps the sign
        sq = sq[:, :, None]
        y_lo = with_sign(e2m1_round(div_by(alo, dm, rcp, ip2)), lo < 0) * sq
        y_hi = with_sign(e2m1_round(div_by(ahi, dm, rcp, ip2)), hi < 0) * sq
        _store(y_ptr + _row_offset(r, sy, WIDE) + wc, _word_join(y_lo, y_hi, DT), m, EVEN)
    else:
        code_lo, idx_lo = _e2m1_signed_code(lo, alo, dm, rcp, ip2)
        code_hi, idx_hi = _e2m1_signed_code(hi, ahi, dm, rcp, ip2)
        _store(y_ptr + _row_offset(r, W, WIDE) + wc, (code_lo | (code_hi << 4)).to(tl.uint8), m, EVEN)
        stored = tl.where(quirk, 0.001953125, s_e4m3)  # 2**-9, the smallest positive E4M3
        _store(scale_ptr + _row_offset(rr[:, None], NB, WIDE) + bb[None, :],
               e4m3_byte(stored, stored < 0).to(tl.uint8), bmask, EVEN)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(gs_ptr, gs)
        # a quirk block (scale stored as 2**-9, fold with 1.0) that keeps a nonzero code cannot be stored exactly:
        # flag it (a plain store of 1: no reduction across the tile, no atomic; padding elements are 0 codes)
        lost = quirk & (tl.max(idx_lo | idx_hi, axis=2) != 0) & bmask
        tl.store(bad_ptr + tl.zeros_like(bmax).to(tl.int32), 1, mask=lost)


def _chunking(granularity: str, block: int | None, amax: torch.Tensor):
    """Launch constants of a per-granularity tensor `amax` for `_chunk_tile` / `_chunk_amax`:
    (BR, BC, SSR, SSB, CB, CH, NBT). Column chunks never cross a block edge: a block of at most TILE_C columns is
    one chunk; a larger block is cut into chunks of its largest divisor up to TILE_C."""
    if granularity == "tensor":
        br, bc, ssr, ssb, cb = WHOLE, WHOLE, 0, 0, TILE_C
    elif granularity == "channel":
        br, bc, ssr, ssb, cb = 1, WHOLE, 1, 0, TILE_C
    else:
        bc = block
        br = block if granularity == "block" else 1
        cb = bc if bc <= TILE_C else max(d for d in range(1, TILE_C + 1) if bc % d == 0)
        ssr, ssb = amax.shape[-1], 1
    ch = triton.next_power_of_2(cb)
    return br, bc, ssr, ssb, cb, ch, max(1, TILE_C // ch)


def _wide(r: int, c: int, *strides: int) -> bool:
    """int64 offsets needed: some offset of a [r, c] launch with these row strides reaches 2**31."""
    return (r - 1) * max(strides + (c,)) + c >= INT32_LIMIT


def _out(r, c, dtype, device):
    """(output tensor, what the kernel writes through, is-bfloat16)."""
    y = torch.empty((r, c), dtype=dtype, device=device)
    bf16 = dtype == torch.bfloat16
    return y, (y.view(torch.int16) if bf16 else y), bf16


def _launch_shape(x, granularity, block, amax, out_stride):
    """(grid, chunk constants, EVEN, WIDE) of an FP8 / INT launch over 2-D x."""
    r, c = x.shape
    br, bc, ssr, ssb, cb, ch, nbt = _chunking(granularity, block, amax)
    grid = (triton.cdiv(r, TILE_R), triton.cdiv(-(-c // cb), nbt))
    even = r % TILE_R == 0 and c % (cb * nbt) == 0 and cb == ch
    return grid, (br, bc, ssr, ssb, cb, ch, nbt), even, _wide(r, c, x.stride(0), out_stride)


def _amax32(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().contiguous()


def fold_fp8(x, granularity, block, amax, out_dtype):
    """FP8 fold of a 2-D x under its per-granularity amax (fp8.fake_quant_fp8), in out_dtype."""
    r, c = x.shape
    y, ya, bf16 = _out(r, c, out_dtype, x.device)
    a = _amax32(amax)
    grid, (br, bc, ssr, ssb, cb, ch, nbt), even, wide = _launch_shape(x, granularity, block, a, y.stride(0))
    _fp8_kernel[grid](x, a, ya, a, r, c, x.stride(0), y.stride(0), ssr, ssb, BR=br, BC=bc, FAKE=True, BF16=bf16,
                      TR=TILE_R, NBT=nbt, CB=cb, CH=ch, EVEN=even, WIDE=wide, SCALAR=granularity == "tensor", **_OPTS)
    return y


def encode_fp8(x, granularity, block, amax):
    """(E4M3 codes (torch.float8_e4m3fn) float8(clamp(x * scale, -448, 448)), inv per block, float32 in amax's
    shape): fp8.quantize_fp8."""
    r, c = x.shape
    codes = torch.empty((r, c), dtype=torch.uint8, device=x.device)
    a = _amax32(amax)
    inv = torch.empty_like(a)
    grid, (br, bc, ssr, ssb, cb, ch, nbt), even, wide = _launch_shape(x, granularity, block, a, c)
    _fp8_kernel[grid](x, a, codes, inv, r, c, x.stride(0), c, ssr, ssb, BR=br, BC=bc, FAKE=False, BF16=False,
                      TR=TILE_R, NBT=nbt, CB=cb, CH=ch, EVEN=even, WIDE=wide, SCALAR=granularity == "tensor", **_OPTS)
    return codes.view(torch.float8_e4m3fn), inv


def fold_int(x, granularity, block, amax, maxb, minb, out_dtype):
    """Symmetric INT fold of a 2-D x under its per-granularity amax (integer.fake_quant_int), in out_dtype."""
    r, c = x.shape
    y, ya, bf16 = _out(r, c, out_dtype, x.device)
    a = _amax32(amax)
    grid, (_, bc, ssr, ssb, cb, ch, nbt), even, wide = _launch_shape(x, granularity, block, a, y.stride(0))
    _int_kernel[grid](x, a, ya, r, c, x.stride(0), y.stride(0), ssr, ssb, float(maxb), float(minb), BC=bc,
                      BF16=bf16, TR=TILE_R, NBT=nbt, CB=cb, CH=ch, EVEN=even, WIDE=wide, SCALAR=granularity == "tensor",
                      **_OPTS)
    return y


NV_TR, NV_TB = 8, 8  # element fold (odd widths, unaligned rows): rows x blocks of 16 per program
NVW_TR, NVW_TB = 16, 8  # word fold and encoder: rows x blocks of 16 per program
NVW_WARPS = 4  # warps per program of the word kernel (Triton's default; bench/sweep_nvfp4_tiles.py times others)
_WORD = {torch.bfloat16: (0, torch.int32), torch.float16: (1, torch.int32), torch.float32: (2, torch.int64)}


def _bamax(block_amax, gamax):
    """(the searched block amax as float32 or a placeholder pointer, whether there is one)."""
    return (_amax32(block_amax), True) if block_amax is not None else (gamax, False)


def _word_ready(x) -> bool:
    """x can be read as words of two elements: an even width, row stride and start (in elements)."""
    return (x.dtype in _WORD and x.shape[1] % 2 == 0 and x.stride(0) % 2 == 0 and x.stride(1) == 1
            and x.data_ptr() % (2 * x.element_size()) == 0)


def _word_launch(x, gamax, block_amax, y, scales, gs, bad):
    """One `_nvfp4_word_kernel` launch over x (`_word_ready`); y: the fold (x's dtype) or the packed bytes."""
    dt, word = _WORD[x.dtype]
    r, c = x.shape
    nb, w = -(-c // 16), c // 2
    xw = x.view(word)
    fake = scales is None
    yw = y.view(word) if fake else y
    g = _amax32(gamax).reshape(1)
    bam, has = _bamax(block_amax, g)
    even = r % NVW_TR == 0 and c % (16 * NVW_TB) == 0
    wide = _wide(r, w, xw.stride(0), yw.stride(0), nb)
    _nvfp4_word_kernel[(triton.cdiv(r, NVW_TR), triton.cdiv(nb, NVW_TB))](
        xw, g, bam, yw, scales if not fake else yw, gs if not fake else g, bad if not fake else g, r, w,
        xw.stride(0), yw.stride(0), nb, HAS_BAMAX=has, DT=dt, FAKE=fake, TR=NVW_TR, TB=NVW_TB, EVEN=even,
        WIDE=wide, num_warps=NVW_WARPS, **_OPTS)


def fold_nvfp4(x, gamax, block_amax, out_dtype):
    """NVFP4 fold of a 2-D x (tensor amax gamax, optional searched block amax [rows, nblocks]) in out_dtype."""
    r, c = x.shape
    if out_dtype == x.dtype and _word_ready(x):
        y = torch.empty((r, c), dtype=out_dtype, device=x.device)
        _word_launch(x, gamax, block_amax, y, None, None, None)
        return y
    nb = -(-c // 16)
    y, ya, bf16 = _out(r, c, out_dtype, x.device)
    g = _amax32(gamax).reshape(1)
    bam, has = _bamax(block_amax, g)
    even = r % NV_TR == 0 and c % (16 * NV_TB) == 0
    wide = _wide(r, c, x.stride(0), y.stride(0))
    _nvfp4_fold_kernel[(triton.cdiv(r, NV_TR), triton.cdiv(nb, NV_TB))](
        x, g, bam, ya, r, c, x.stride(0), y.stride(0), nb, HAS_BAMAX=has, BF16=bf16, TR=NV_TR, TB=NV_TB, EVEN=even,
        WIDE=wide, **_OPTS)
    return y


def encode_nvfp4(x, gamax, block_amax):
    """(packed E2M1 codes uint8 [rows, cols/2], E4M3 block scales, global scale float32 [1], int32 [1]: 1 where a
    block whose scale underflows E4M3 keeps a nonzero code, i.e. the weight cannot be stored exactly, else 0).
    The width must be even."""
    if x.dtype not in _WORD:
        x = x.float()
    if not _word_ready(x):
        x = x.contiguous()  # words of two elements need an even row stride and an aligned start
    r, c = x.shape
    packed = torch.empty((r, c // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((r, -(-c // 16)), dtype=torch.uint8, device=x.device)
    gs = torch.empty((1,), dtype=torch.float32, device=x.device)
    bad = torch.zeros((1,), dtype=torch.int32, device=x.device)
    _word_launch(x, gamax, block_amax, packed, scales, gs, bad)
    return packed, scales.view(torch.float8_e4m3fn), gs, bad
