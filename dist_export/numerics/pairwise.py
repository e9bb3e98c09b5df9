"""Fixed-order float sums shared by the CPU reference and the GPU kernels (stage 2, every rank).

`pairwise_sum` adds adjacent pairs level by level over the last dim zero-padded to a power of two:
((x0+x1)+(x2+x3))+... Every addition is one IEEE operation between the same two values on every device, so the
CPU (torch) and the Triton kernels (`kernels.jitlib.pair_tree_sum`) give the same bits, whatever the library's
own reduction order would be. Padding adds exact zeros, which change no sum.
"""
from __future__ import annotations

import torch


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in the fixed adjacent-pairs tree order."""
    n = x.shape[-1]
    p = 1 << max(0, (n - 1).bit_length())
    if p != n:
        x = torch.cat([x, x.new_zeros((*x.shape[:-1], p - n))], dim=-1)
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]
