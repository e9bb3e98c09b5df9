"""Fold (fake quant) and real-quant encoder kernels (stage 2, every rank): one pass over a 2-D weight.

Each element reads its scale through a block map: element (r, c) uses entry (r // BR, c // BC) of a small
per-block tensor (strides 0 for a per-tensor value), so one kernel serves the tensor, channel, group and 2-D
block granularities. The float32 arithmetic is the reference's (`fp8.py`, `integer.py`, `nvfp4.py`); the fold
result is cast once (round to nearest even) to the output dtype, as `registry.fake_quant` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jitlib import div_rn, e2m1_code, e2m1_round, e4m3_byte, e4m3_round, rint, sign_bit, store_cast, with_sign

_OPTS = {"enable_fp_fusion": False}
TILE_R, TILE_C = 16, 128  # rows x columns per program (FP8, INT): 2048 elements


@triton.jit
def _chunk_tile(R, C, TR: tl.constexpr, NBT: tl.constexpr, CB: tl.constexpr, CH: tl.constexpr):
    """A tile of TR rows x NBT column chunks of CB elements (padded to CH, a power of two): element (r, b, j) is
    column b * CB + j. Every element of a chunk has the same per-block scale, so the scales are loaded once per
    (row, chunk) as a small [TR, NBT] tensor instead of once per element."""
    rr = tl.program_id(0) * TR + tl.arange(0, TR)
    bb = tl.program_id(1) * NBT + tl.arange(0, NBT)
    j = tl.arange(0, CH)[None, None, :]
    r = rr[:, None, None]
    col = bb[None, :, None] * CB + j
    m = (r < R) & (col < C) & (j < CB)
    return rr, bb, r, col, m


@triton.jit
def _chunk_scale(ptr, rr, bb, R, C, SSR, SSB, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr):
    """Per-block value of every (row, chunk) of the tile, [TR, NBT, 1]: entry (r // BR) * SSR + (b * CB // BC) *
    SSB of the per-block tensor (SSR = SSB = 0 for one value per tensor, SSB = 0 for one per row)."""
    idx = (rr[:, None] // BR) * SSR + ((bb[None, :] * CB) // BC) * SSB
    ok = (rr[:, None] < R) & (bb[None, :] * CB < C)
    return tl.load(ptr + idx, mask=ok, other=1.0)[:, :, None]


@triton.jit
def _fp8_kernel(x_ptr, scale_ptr, inv_ptr, y_ptr, code_ptr, R, C, sx, sy, SSR, SSB, BR: tl.constexpr,
                BC: tl.constexpr, FAKE: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr, NBT: tl.constexpr,
                CB: tl.constexpr, CH: tl.constexpr):
    rr, bb, r, col, m = _chunk_tile(R, C, TR, NBT, CB, CH)
    x = tl.load(x_ptr + r.to(tl.int64) * sx + col, mask=m, other=0.0).to(tl.float32)
    v = x * _chunk_scale(scale_ptr, rr, bb, R, C, SSR, SSB, BR, BC, CB)
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    mag = e4m3_round(tl.abs(v))
    neg = sign_bit(v)
    if FAKE:
        y = with_sign(mag, neg) * _chunk_scale(inv_ptr, rr, bb, R, C, SSR, SSB, BR, BC, CB)
        store_cast(y_ptr, r.to(tl.int64) * sy + col, y, m, BF16)
    else:
        tl.store(code_ptr + r.to(tl.int64) * C + col, e4m3_byte(mag, neg).to(tl.uint8), mask=m)


@triton.jit
def _int_kernel(x_ptr, scale_ptr, y_ptr, R, C, sx, sy, SSR, SSB, MAXB, MINB, BC: tl.constexpr,
                BF16: tl.constexpr, TR: tl.constexpr, NBT: tl.constexpr, CB: tl.constexpr, CH: tl.constexpr):
    """scale per block from `int_scales` (0 marks a zero block): one division per element, not two."""
    rr, bb, r, col, m = _chunk_tile(R, C, TR, NBT, CB, CH)
    x = tl.load(x_ptr + r.to(tl.int64) * sx + col, mask=m, other=0.0).to(tl.float32)
    s = _chunk_scale(scale_ptr, rr, bb, R, C, SSR, SSB, 1, BC, CB)
    zero = s == 0.0
    scale = tl.where(zero, MAXB, s)
    y = div_rn(tl.minimum(tl.maximum(rint(x * scale), MINB), MAXB), scale)
    y = tl.where(zero, 0.0, y)
    store_cast(y_ptr, r.to(tl.int64) * sy + col, y, m, BF16)


@triton.jit
def _nvfp4_kernel(x_ptr, gs_ptr, bamax_ptr, y_ptr, packed_ptr, scale_ptr, bad_ptr, R, C, sx, sy, NB,
                  HAS_BAMAX: tl.constexpr, FAKE: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr, TB: tl.constexpr,
                  WORDS: tl.constexpr):
    """Tile of TR rows x TB blocks of 16; element arithmetic of nvfp4.block_scales/_signed_q. WORDS (widths a
    multiple of 8): the packed codes are written as int32 words of 8 codes (packed_ptr is the uint8 output
    viewed as int32), not byte by byte."""
    rr = tl.program_id(0) * TR + tl.arange(0, TR)
    bb = tl.program_id(1) * TB + tl.arange(0, TB)
    r = rr[:, None, None]
    col = bb[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    m = (r < R) & (col < C)
    x = tl.load(x_ptr + r.to(tl.int64) * sx + col, mask=m, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    bmask = (rr[:, None] < R) & (bb[None, :] < NB)
    if HAS_BAMAX:
        bmax = tl.load(bamax_ptr + rr[:, None].to(tl.int64) * NB + bb[None, :], mask=bmask, other=0.0)
    else:
        bmax = tl.max(ax, axis=2)
    gs = tl.load(gs_ptr)
    s_e4m3 = e4m3_round(tl.minimum(div_rn(bmax, 6.0 * gs), 448.0))
    sq = s_e4m3 * gs
    quirk = sq < 1e-5
    sq = tl.where(quirk, 1.0, sq)[:, :, None]
    a = div_rn(ax, sq)
    neg = x < 0  # where(x >= 0, q, -q): -0.0 gives +0.0; a negative x rounding to 0 keeps the sign
    if FAKE:
        y = with_sign(e2m1_round(a), neg) * sq
        store_cast(y_ptr, r.to(tl.int64) * sy + col, y, m, BF16)
    else:
        idx = e2m1_code(a)
        code = idx | tl.where(neg, 8, 0)
        if WORDS:  # codes 8h .. 8h+7 of a row -> one little-endian word: byte k holds codes 2k (low) and 2k+1
            shift = (tl.arange(0, 8) * 4)[None, None, :]
            word = tl.sum(tl.reshape(code, (TR, TB * 2, 8)) << shift, axis=2)  # disjoint bits: the sum is an OR
            hh = tl.program_id(1) * (TB * 2) + tl.arange(0, TB * 2)
            wm = (rr[:, None] < R) & (hh[None, :] * 8 < C)
            tl.store(packed_ptr + rr[:, None].to(tl.int64) * (C // 8) + hh[None, :], word, mask=wm)
        else:
            lo, hi = tl.split(tl.reshape(code, (TR, TB, 8, 2)))
            pcol = bb[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
            pm = (r < R) & (pcol * 2 < C)
            tl.store(packed_ptr + r.to(tl.int64) * (C // 2) + pcol, (lo | (hi << 4)).to(tl.uint8), mask=pm)
        stored = tl.where(quirk, 0.001953125, s_e4m3)  # 2**-9, the smallest positive E4M3
        tl.store(scale_ptr + rr[:, None].to(tl.int64) * NB + bb[None, :],
                 e4m3_byte(stored, stored < 0).to(tl.uint8), mask=bmask)
        # a quirk block (scale stored as 2**-9, fold with 1.0) that keeps a nonzero code cannot be stored exactly:
        # flag it (a plain store of 1: no reduction across the tile, no atomic; padding elements are 0 codes)
        lost = quirk & (tl.max(idx, axis=2) != 0) & bmask
        tl.store(bad_ptr + tl.zeros_like(bmax).to(tl.int32), 1, mask=lost)


def _chunking(granularity: str, block: int | None, values: torch.Tensor):
    """Launch constants of a per-granularity tensor `values` for `_chunk_tile` / `_chunk_scale`:
    (BR, BC, SSR, SSB, CB, CH, NBT). Column chunks never cross a block edge: a block of at most TILE_C columns is
    one chunk; a larger block is cut into chunks of its largest divisor up to TILE_C."""
    if granularity in ("tensor", "channel"):
        cb, br, bc, ssb = TILE_C, 1, 1, 0
        ssr = 0 if granularity == "tensor" else 1
    else:
        bc = block
        br = block if granularity == "block" else 1
        cb = bc if bc <= TILE_C else max(d for d in range(1, TILE_C + 1) if bc % d == 0)
        ssr, ssb = values.shape[-1], 1
    ch = triton.next_power_of_2(cb)
    return br, bc, ssr, ssb, cb, ch, max(1, TILE_C // ch)


def _out(r, c, dtype, device):
    """(output tensor, what the kernel writes through, is-bfloat16)."""
    y = torch.empty((r, c), dtype=dtype, device=device)
    bf16 = dtype == torch.bfloat16
    return y, (y.view(torch.int16) if bf16 else y), bf16


def _grid(r, c, cb, nbt):
    return (triton.cdiv(r, TILE_R), triton.cdiv(-(-c // cb), nbt))


def fold_fp8(x, granularity, block, scale, inv, out_dtype):
    """FP8 fold of a 2-D x with the per-granularity (scale, inv) of fp8.choose_fp8_inv_scale, in out_dtype."""
    r, c = x.shape
    br, bc, ssr, ssb, cb, ch, nbt = _chunking(granularity, block, scale)
    y, ya, bf16 = _out(r, c, out_dtype, x.device)
    _fp8_kernel[_grid(r, c, cb, nbt)](x, scale.float().contiguous(), inv.float().contiguous(), ya, ya, r, c,
                                      x.stride(0), y.stride(0), ssr, ssb, BR=br, BC=bc, FAKE=True, BF16=bf16,
                                      TR=TILE_R, NBT=nbt, CB=cb, CH=ch, **_OPTS)
    return y


def encode_fp8(x, granularity, block, scale):
    """E4M3 codes (torch.float8_e4m3fn) of a 2-D x: float8(clamp(x * scale, -448, 448))."""
    r, c = x.shape
    br, bc, ssr, ssb, cb, ch, nbt = _chunking(granularity, block, scale)
    codes = torch.empty((r, c), dtype=torch.uint8, device=x.device)
    s = scale.float().contiguous()
    _fp8_kernel[_grid(r, c, cb, nbt)](x, s, s, codes, codes, r, c, x.stride(0), c, ssr, ssb, BR=br, BC=bc,
                                      FAKE=False, BF16=False, TR=TILE_R, NBT=nbt, CB=cb, CH=ch, **_OPTS)
    return codes.view(torch.float8_e4m3fn)


def int_scales(amax, maxb):
    """float32(maxb) / amax per block by torch's true division (the reference's `scale`), 0 where the amax is
    at most 2**-24 (the fold gives zeros there)."""
    a = amax.float()
    zero = a <= 5.960464477539063e-08
    scale = torch.full_like(a, maxb) / torch.where(zero, torch.ones_like(a), a)
    return torch.where(zero, torch.zeros_like(scale), scale).contiguous()


def fold_int(x, granularity, block, amax, maxb, minb, out_dtype):
    r, c = x.shape
    _, bc, ssr, ssb, cb, ch, nbt = _chunking(granularity, block, amax)
    y, ya, bf16 = _out(r, c, out_dtype, x.device)
    _int_kernel[_grid(r, c, cb, nbt)](x, int_scales(amax, maxb), ya, r, c, x.stride(0), y.stride(0), ssr, ssb,
                                      float(maxb), float(minb), BC=bc, BF16=bf16, TR=TILE_R, NBT=nbt, CB=cb,
                                      CH=ch, **_OPTS)
    return y


NV_TR, NV_TB = 8, 8


def _nvfp4_launch(x, gs, block_amax, fake, out_dtype):
    r, c = x.shape
    nb = -(-c // 16)
    grid = (triton.cdiv(r, NV_TR), triton.cdiv(nb, NV_TB))
    gs1 = gs.float().reshape(1)
    bam = block_amax.float().contiguous() if block_amax is not None else gs1
    if fake:
        y, ya, bf16 = _out(r, c, out_dtype, x.device)
        _nvfp4_kernel[grid](x, gs1, bam, ya, ya, ya, ya, r, c, x.stride(0), y.stride(0), nb,
                            HAS_BAMAX=block_amax is not None, FAKE=True, BF16=bf16, TR=NV_TR, TB=NV_TB, WORDS=False,
                            **_OPTS)
        return y
    packed = torch.empty((r, c // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((r, nb), dtype=torch.uint8, device=x.device)
    bad = torch.zeros((1,), dtype=torch.int32, device=x.device)
    words = c % 8 == 0
    out = packed.view(torch.int32) if words else packed
    _nvfp4_kernel[grid](x, gs1, bam, out, out, scales, bad, r, c, x.stride(0), 0, nb,
                        HAS_BAMAX=block_amax is not None, FAKE=False, BF16=False, TR=NV_TR, TB=NV_TB, WORDS=words,
                        **_OPTS)
    return packed, scales.view(torch.float8_e4m3fn), bad


def fold_nvfp4(x, gs, block_amax, out_dtype):
    """NVFP4 fold of a 2-D x (global scale gs, optional searched block amax [rows, nblocks]) in out_dtype."""
    return _nvfp4_launch(x, gs, block_amax, True, out_dtype)


def encode_nvfp4(x, gs, block_amax):
    """(packed E2M1 codes uint8 [rows, cols/2], E4M3 block scales, int32 [1]: 1 where a block whose scale
    underflows E4M3 keeps a nonzero code, i.e. the weight cannot be stored exactly, else 0)."""
    return _nvfp4_launch(x, gs, block_amax, False, None)
