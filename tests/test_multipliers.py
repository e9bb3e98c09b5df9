"""Stored multipliers for loaders that multiply where the fold divides (numerics/multipliers.py), checked against
the formats.md formulas written out here, for every code and many amax values."""
from __future__ import annotations

import pytest
import torch

from dist_export.numerics.multipliers import int_multiplier, nvfp4_global_scale


def _amax(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g) + 0.5
    return (mant * torch.exp2(torch.randint(-14, 4, (n,), generator=g).float())).float()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int_multiplier_reproduces_the_division_for_every_code(bits, dtype):
    amax = _amax(20000, bits)
    maxb = 2 ** (bits - 1) - 1
    c, found = int_multiplier(amax, float(maxb), float(-maxb - 1), dtype)
    assert c.dtype == torch.float64 and c.shape == amax.shape
    q = torch.arange(-maxb - 1, maxb + 1, dtype=torch.float32)
    s = torch.full_like(amax, float(maxb)) / amax  # formats.md: scale = maxb / amax, y = q / scale
    want = (q / s[:, None]).to(dtype)
    got = (q.double() * c[:, None]).to(dtype)  # compressed-tensors: q.to(scale.dtype) * scale, then the model dtype
    exact = (got == want).all(dim=1)
    assert torch.equal(exact, found) and bool(found.all())
    # a float32 scale would not do: the plain reciprocal misses groups (float32 models: most of them)
    plain = ((q * (torch.ones_like(s) / s)[:, None]).to(dtype) == want).all(dim=1)
    assert not bool(plain.all()) or (bits == 4 and dtype != torch.float32)


def test_int_multiplier_zero_amax_groups_need_no_scale():
    c, found = int_multiplier(torch.tensor([0.0, 1.0]), 7.0, -8.0, torch.bfloat16)
    assert found.all() and torch.isfinite(c).all() and (c > 0).all()


def test_nvfp4_global_scale_reproduces_block_products():
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    s = e4m3[torch.isfinite(e4m3) & (e4m3 > 0)]
    q = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    misses = 0
    for amax in _amax(300, 7):
        gs = amax / torch.tensor(2688.0)  # formats.md: gs = amax / (6 * 448)
        G, ok = nvfp4_global_scale(gs, torch.bfloat16)
        assert G.dtype == torch.float32
        live = s[s * gs >= 1e-5]
        same = torch.equal((q * (live * gs)[:, None]).to(torch.bfloat16), (q * (live / G)[:, None]).to(torch.bfloat16))
        assert same == ok
        misses += not ok
    assert misses == 0
