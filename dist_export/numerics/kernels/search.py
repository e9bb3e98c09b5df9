"""MSE scale search kernels (stage 2, every rank): one program folds BLOCKS weight blocks with every candidate
amax, keeping the candidates and the running best in registers, and writes the chosen amax per block.

Same function as `dist_export.numerics.mse` (the reference): candidate k is base * ratio[k] (ratios computed by
torch and passed in), the error of a candidate is the float64 sum of (fold - x)**2 over the block, summed by
adjacent pairs level by level (`pair_tree_sum`, the reference's `pairwise_sum`) over the block zero-padded to a
power of two, and the first candidate with the least error wins (strict `<`, as torch.argmin's first minimum).
Squares of float32 differences are exact in float64 and every addition happens in the same order on both paths,
so the errors, not only the argmin, are identical bit for bit. The NVFP4 kernel folds each block once per E4M3 block scale its candidates
reach (about 9 of 64 candidates) instead of once per candidate (see `_nvfp4_search_kernel`). Per element
divisions by a block's value are
`jitlib.div_by` (the block's reciprocal once per candidate, then multiply-adds: the IEEE quotient's bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jitlib import (div_by, div_rn, divisor_parts, e2m1_round, e4m3_byte, e4m3_round, pair_tree_sum, rint_clamped,
                     with_sign)

MAX_INT_BLOCK = 256  # INT groups up to this size (padded to a power of two) run here; larger ones use torch


@triton.jit
def _nvfp4_code(base, ratio_ptr, k, six_gs):
    """(candidate k's block amax, the E4M3 code 0..126 of its block scale min(cand / (6 gs), 448))."""
    cand = base * tl.load(ratio_ptr + k)
    return cand, e4m3_byte(e4m3_round(tl.minimum(div_rn(cand, six_gs), 448.0)), cand < 0.0)


@triton.jit
def _e4m3_value(code):
    """float32 value of a positive E4M3 code 0..126 (the inverse of e4m3_byte)."""
    e = code >> 3
    normal = (((e + 120) << 23) | ((code & 7) << 20)).to(tl.float32, bitcast=True)
    return tl.where(e > 0, normal, (code & 7).to(tl.float32) * 0.001953125)


@triton.jit
def _nvfp4_error(x, ax, neg, s_e4m3, gs):
    """Per block the float64 pairwise sum of (fold - x)**2 under E4M3 block scale s_e4m3 [BLOCKS]."""
    sq = s_e4m3 * gs
    sq = tl.where(sq < 1e-5, 1.0, sq)
    dm, rcp, ip2 = divisor_parts(sq)
    q = e2m1_round(div_by(ax, dm[:, None], rcp[:, None], ip2[:, None]))
    d = (with_sign(q, neg) * sq[:, None] - x).to(tl.float64)
    return pair_tree_sum(d * d, 4)


@triton.jit
def _nvfp4_search_kernel(x_ptr, gs_ptr, ratio_ptr, out_ptr, R, C, stride_r, NB,
                         K: tl.constexpr, BLOCKS: tl.constexpr, NJ: tl.constexpr):
    """A candidate's fold depends on its E4M3 block scale only, and the K candidates (non-increasing) of a block
    fall on a few consecutive E4M3 codes (at most 10 over the ratios' factor of 2): the block is folded once per
    code (top code first), each code's error being that of every candidate on it, and the chosen candidate is
    the first one on the first code of least error, which is torch.argmin's first minimum over the candidates.
    Blocks whose codes would not fit NJ slots or not descend (other ratios) take the loop over every candidate."""
    pid = tl.program_id(0)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)
    row = blk // NB
    col = (blk % NB)[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = (blk < R * NB)[:, None] & (col < C)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_r + col, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    neg = x < 0
    base = tl.max(ax, axis=1)
    gs = tl.load(gs_ptr)
    six_gs = 6.0 * gs
    _, top = _nvfp4_code(base, ratio_ptr, 0, six_gs)
    hits = tl.zeros((BLOCKS,), tl.int32)  # bit j: some candidate's code is top - j
    prev = top
    ok = top >= 0
    for k in range(K):
        _, code = _nvfp4_code(base, ratio_ptr, k, six_gs)
        ok = ok & (code <= prev) & (top - code < NJ)
        hits = hits | (1 << tl.minimum(top - code, NJ - 1))
        prev = code
    if tl.min(ok.to(tl.int32)) == 1:
        best_err = tl.full((BLOCKS,), float("inf"), tl.float64)
        best_j = tl.zeros((BLOCKS,), tl.int32)
        spread = tl.max(top - prev, axis=0)  # the codes span top - spread .. top in every block
        for j in range(NJ):
            if j <= spread:
                err = _nvfp4_error(x, ax, neg, _e4m3_value(tl.maximum(top - j, 0)), gs)
                take = (((hits >> j) & 1) != 0) & (err < best_err)
                best_err = tl.where(take, err, best_err)
                best_j = tl.where(take, j, best_j)
        first = tl.full((BLOCKS,), K, tl.int32)
        for k in range(K):
            _, code = _nvfp4_code(base, ratio_ptr, k, six_gs)
            first = tl.where((top - code == best_j) & (first == K), k, first)
        best = base * tl.load(ratio_ptr + first)
    else:
        best_err = tl.full((BLOCKS,), float("inf"), tl.float64)
        best = base
        for k in range(K):
            cand, code = _nvfp4_code(base, ratio_ptr, k, six_gs)
            err = _nvfp4_error(x, ax, neg, _e4m3_value(code), gs)
            take = err < best_err
            best_err = tl.where(take, err, best_err)
            best = tl.where(take, cand, best)
    tl.store(out_ptr + blk, best, mask=blk < R * NB)


@triton.jit
def _int_search_kernel(x_ptr, base_ptr, ratio_ptr, out_ptr, R, C, stride_r, NB, BS, MAXB, MINB,
                       K: tl.constexpr, BLOCKS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)
    row = blk // NB
    j = tl.arange(0, P)[None, :]
    col = (blk % NB)[:, None] * BS + j
    mask = (blk < R * NB)[:, None] & (j < BS) & (col < C)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_r + col, mask=mask, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + blk, mask=blk < R * NB, other=0.0)
    best_err = tl.full((BLOCKS,), float("inf"), tl.float64)
    best = base
    for k in range(K):
        cand = base * tl.load(ratio_ptr + k)
        zero = cand <= 5.960464477539063e-08  # 2**-24
        scale = div_rn(MAXB + tl.zeros_like(cand), tl.where(zero, 1.0, cand))
        dm, rcp, ip2 = divisor_parts(scale)
        v = rint_clamped(x * scale[:, None], MINB, MAXB)
        y = tl.where(v == 0.0, v, div_by(v, dm[:, None], rcp[:, None], ip2[:, None]))  # v / scale
        y = tl.where(zero[:, None], 0.0, y)
        d = (y - x).to(tl.float64)
        err = pair_tree_sum(d * d, LOG2P)
        take = err < best_err
        best_err = tl.where(take, err, best_err)
        best = tl.where(take, cand, best)
    tl.store(out_ptr + blk, best, mask=blk < R * NB)


def _launch_opts() -> dict:
    return {"enable_fp_fusion": False}


def search_nvfp4(x: torch.Tensor, gs: torch.Tensor, ratios: torch.Tensor, blocks: int = 64, warps: int = 4):
    """Chosen per-block amax [rows, ceil(cols/16)] (float32) of a 2-D weight; gs the float32 global scale."""
    x = x.contiguous()
    r, c = x.shape
    nb = -(-c // 16)
    out = torch.empty((r, nb), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(r * nb, blocks),)
    _nvfp4_search_kernel[grid](x, gs.float().reshape(1), ratios.contiguous(), out, r, c, x.stride(0), nb,
                               K=ratios.numel(), BLOCKS=blocks, NJ=16, num_warps=warps, **_launch_opts())
    return out


def int_search_supported(block: int) -> bool:
    return block <= MAX_INT_BLOCK


def search_int(x: torch.Tensor, base: torch.Tensor, ratios: torch.Tensor, block: int, maxb: float, minb: float,
               elements: int = 2048, warps: int = 4):
    """Chosen amax per block of `block` columns (base: the max-based amax per block, [rows, nblocks])."""
    x = x.contiguous()
    r, c = x.shape
    nb = -(-c // block)
    p = triton.next_power_of_2(block)
    out = torch.empty((r, nb), dtype=torch.float32, device=x.device)
    blocks = max(1, elements // p)
    grid = (triton.cdiv(r * nb, blocks),)
    _int_search_kernel[grid](x, base.float().contiguous(), ratios.contiguous(), out, r, c, x.stride(0), nb, block,
                             float(maxb), float(minb), K=ratios.numel(), BLOCKS=blocks, P=p,
                             LOG2P=p.bit_length() - 1, num_warps=warps, **_launch_opts())
    return out
