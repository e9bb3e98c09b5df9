"""MXFP4 / MXFP8 fold against a scalar reference written from the OCP MX v1.0 definition (docs/formats-notes.md):
shared exponent floor(log2(amax)) - emax, E8M0 range [-127, 127], elements rounded to nearest (ties to even)
with saturation."""
from __future__ import annotations

import math

import pytest
import torch

from dist_export.numerics.mx import mx_fake_quant


def _e2m1_values() -> list[float]:
    return [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e4m3_values() -> list[float]:
    vals = [0.0]
    for e in range(-6, 9):  # normals: (1 + m/8) * 2**e, e in [-6, 8], except 1.875 * 2**8 (NaN)
        for m in range(8):
            if e == 8 and m == 7:
                continue
            vals.append((1 + m / 8) * 2.0**e)
    vals += [m / 8 * 2.0**-6 for m in range(1, 8)]  # subnormals
    return sorted(set(vals))


def _round_nearest_even(v: float, grid: list[float]) -> float:
    """Nearest grid magnitude (ties: the one with an even mantissa code, i.e. even index in the grid)."""
    a = min(abs(v), grid[-1])
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), i % 2))
    return math.copysign(grid[best], v) if grid[best] != 0 else 0.0


def _ref_block(xs: list[float], emax: int, grid: list[float]) -> list[float]:
    a = max(abs(v) for v in xs)
    if a == 0:
        k = -127
    else:
        k = math.floor(math.log2(a))
        if 2.0**k > a:  # guard the float log2 at exact powers of two
            k -= 1
        if 2.0 ** (k + 1) <= a:
            k += 1
        k = max(-127, min(127, k - emax))
    scale = 2.0**k
    return [_round_nearest_even(v / scale, grid) * scale for v in xs]


def _ref(x: torch.Tensor, fmt: str) -> torch.Tensor:
    emax, grid = (2, _e2m1_values()) if fmt == "mxfp4" else (8, _e4m3_values())
    rows = []
    for row in x.double().tolist():
        out = []
        for start in range(0, len(row), 32):
            out += _ref_block(row[start:start + 32], emax, grid)
        rows.append(out)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("cols", [64, 70])
def test_mx_fold_matches_the_scalar_reference(fmt, cols):
    torch.manual_seed(0)
    x = (torch.randn(6, cols) * torch.logspace(-3, 3, 6).unsqueeze(1)).bfloat16().float()
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 6.0 * 2.0**-3  # exact powers of two and ties
    x[1, 6] = -2.5 * 2.0**-3
    x[2, 0] = 1e-30  # a tiny block next to ordinary ones
    got = mx_fake_quant(x, fmt)
    assert got.shape == x.shape
    assert torch.equal(got, _ref(x, fmt))


def test_mx_saturates_the_block_max_and_keeps_scales_powers_of_two():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 7.5, 0.3  # amax 7.5: k = 2 - 2 = 0, so 7.5 saturates to 6
    y = mx_fake_quant(x, "mxfp4")
    assert y[0, 0].item() == 6.0 and y[0, 1].item() == 0.5
    x8 = torch.zeros(1, 32)
    x8[0, 0] = 500.0  # amax 500: k = 8 - 8 = 0, 500 saturates to 448
    assert mx_fake_quant(x8, "mxfp8")[0, 0].item() == 448.0
