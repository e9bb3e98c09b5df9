"""Weight scale search by mean squared error (the compute-heavy recipes `nvfp4-mse`, `int4-w4a16-mse`).

Per block (an INT group or channel, or an NVFP4 block of 16), try K candidate amax values
    amax_k = amax_max * (1 - 0.5 * k / K),  k = 0 .. K-1         (k = 0 is the max-based choice)
fold the block with each candidate and keep the one with the least squared error (the first on ties). The
result is a per-block amax; the ordinary formulas then use it, so real-quant scales follow it too.

Vectorised over candidates and rows in chunks that bound memory (about `chunk_bytes(device)` of candidate
folds): large on a GPU (few kernel launches; the caching allocator reuses the memory), small on a CPU, where
a chunk's temporaries should stay in the core's own cache. Measured on the 2-core machine (llama-small,
int4-w4a16-mse, one thread): 256 MB chunks spent 4x more time in page faults (each temporary is mmapped and
unmapped by the C allocator) than in arithmetic, 23.9 s -> 5.1 s with 16 MB; and two processes at once slowed
each other 1.1-1.6x with 16 MB chunks (the shared L3) but not at all with 2 MB.
On CUDA (Triton importable) the search runs in one kernel per weight (`kernels/search.py`) that reads each
block once and keeps the candidates in registers; this torch code is the CPU path and the kernel's reference.
Both give the same chosen amax bit for bit, ties included:
  * every fold is the same elementwise float32 arithmetic (true divisions, no fused multiply-add);
  * a candidate's error is the float64 sum of (fold - x)**2 over the block; each term is exact in float64
    (the square of a float32 difference), and the sum is taken in one fixed order on both paths
    (`pairwise.pairwise_sum`: adjacent pairs level by level over the block zero-padded to a power of two),
    so the errors themselves are identical, not only close;
  * ties go to the smallest candidate index k (the largest amax): torch.argmin returns the first minimum,
    the kernel replaces its running best only on a strictly smaller error.
`tests/test_kernels.py` checks this on random, ragged, all-zero, tiny and huge-range weights and on inputs
built to tie.
"""
from __future__ import annotations

import torch

from .blocks import pad_to, reduce_abs_max
from .pairwise import pairwise_sum
from .registry import get_format, kernel_for
from .spec import QuantSpec

CHUNK_BYTES = {"cuda": 256 * 1024 * 1024, "cpu": 2 * 1024 * 1024}


def chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])


def candidate_ratios(k: int, device) -> torch.Tensor:
    steps = torch.arange(k, dtype=torch.float32, device=device)
    return torch.ones_like(steps) - (steps * 0.5) / torch.full_like(steps, float(k))


def search_blocks(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """x [out, in] -> [out, nblocks, bs] (zero-padded) and bs."""
    if spec.granularity == "group":
        bs = spec.block_size
    else:  # channel / tensor: one block per row (tensor search is done per row, then max-combined below)
        bs = x.shape[-1]
    xp = pad_to(x, -1, bs)
    return xp.reshape(x.shape[0], xp.shape[-1] // bs, bs), bs


def fold_candidates(xb: torch.Tensor, cand: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    """Fold blocks xb [r, nb, bs] with candidate amax cand [K, r, nb] -> [K, r, nb, bs] (fp32): the format's own
    elementwise fold (`NumericFormat.search_fold`; `amax` is the amax the search was given)."""
    return get_format(spec.fmt).search_fold(xb, cand, spec, amax)


def search_block_amax(w: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, tick=None):
    """(amax, block_amax): INT returns the searched per-group amax (and None); a tensor-amax format (NVFP4)
    keeps the global amax and returns the searched per-block amax."""
    x = w.float()
    if x.dim() != 2:
        raise ValueError(f"MSE scale search needs a 2-D weight, got {tuple(x.shape)}")
    fmt = get_format(spec.fmt)
    kernel = kernel_for(fmt, "search", w)
    found = kernel(w, spec, amax.to(w.device)) if kernel is not None else None
    if found is not None:
        if tick is not None:
            tick()
        return found
    xb, bs = search_blocks(x, spec)
    base = reduce_abs_max(x, "group", bs) if fmt.tensor_amax or spec.granularity != "group" else amax.float()
    amax_here = amax.to(x.device)
    ratios = candidate_ratios(spec.mse_candidates, x.device).view(-1, 1, 1)
    per_row = spec.mse_candidates * xb.shape[1] * bs * 4 * 6  # candidate folds and temporaries, fp32
    rows = max(1, chunk_bytes(x.device) // max(per_row, 1))
    chosen = torch.empty_like(base)
    for r0 in range(0, x.shape[0], rows):
        blk, b = xb[r0:r0 + rows], base[r0:r0 + rows]
        cand = b.unsqueeze(0) * ratios  # [K, r, nb]
        err = pairwise_sum((fold_candidates(blk, cand, spec, amax_here) - blk.unsqueeze(0)).double().square())
        best = torch.argmin(err, dim=0, keepdim=True)  # first minimum on ties
        chosen[r0:r0 + rows] = torch.gather(cand, 0, best).squeeze(0)
        if tick is not None:
            tick()
    if fmt.tensor_amax:
        return amax, chosen
    if spec.granularity == "tensor":
        return chosen.amax(), None
    return chosen.reshape(base.shape), None
