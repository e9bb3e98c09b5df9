"""MSE scale search: a plain per-block loop (written from the recipe's definition) picks the same candidates."""
from __future__ import annotations

import pytest
import torch

from numerics_reference import e2m1_round, ref_int


def _ratio(k: int, K: int) -> torch.Tensor:
    return torch.tensor(1.0) - torch.tensor(k * 0.5) / torch.tensor(float(K))


def _fold_nvfp4_block(x: torch.Tensor, bamax: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    s = torch.clamp(bamax / (torch.tensor(6.0) * gs), max=448.0)
    sq = s.to(torch.float8_e4m3fn).float() * gs
    sq = torch.where(sq < 1e-5, torch.ones_like(sq), sq)
    q = e2m1_round(x.abs() / sq)
    return torch.where(x >= 0, q, -q) * sq


def reference_search(w: torch.Tensor, fmt: str, bs: int, K: int) -> torch.Tensor:
    x = w.float()
    rows, cols = x.shape
    nb = -(-cols // bs)
    out = torch.empty(rows, nb)
    gamax = x.abs().amax()
    gs = gamax / torch.tensor(2688.0)
    for r in range(rows):
        for b in range(nb):
            blk = x[r, b * bs:(b + 1) * bs]
            bmax = blk.abs().amax()
            best, best_err = None, None
            for k in range(K):
                cand = bmax * _ratio(k, K)
                if fmt == "nvfp4":
                    y = _fold_nvfp4_block(blk, cand, gs)
                else:
                    y = ref_int(blk, cand.expand_as(blk), 4 if fmt == "int4" else 8)
                err = (y.double() - blk.double()).square().sum()
                if best_err is None or err < best_err:
                    best, best_err = cand, err
            out[r, b] = best
    return out


@pytest.mark.parametrize("fmt,bs", [("int4", 32), ("nvfp4", 16), ("int8", 32)])
@pytest.mark.parametrize("shape", [(6, 64), (5, 40)])
def test_search_matches_plain_loop(fmt, bs, shape):
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant
    from dist_export.numerics.mse import search_block_amax

    g = torch.Generator().manual_seed(hash((fmt, shape)) % 1000)
    w = (torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[1])).to(torch.bfloat16)
    K = 16
    spec = QuantSpec(fmt, "group", bs, "mse", K)
    amax = compute_amax(w, spec)
    got_amax, got_block = search_block_amax(w, spec, amax)
    chosen = got_block if fmt == "nvfp4" else got_amax
    want = reference_search(w, fmt, bs, K)
    assert torch.equal(chosen, want)
    # never worse than the max-based scale
    base = QuantSpec(fmt, "group", bs)
    e_max = (fake_quant(w, base, amax).float() - w.float()).square().sum()
    e_mse = (fake_quant(w, spec, got_amax, got_block).float() - w.float()).square().sum()
    assert e_mse <= e_max


def test_mse_recipe_exports_and_reverifies(tmp_path):
    from helpers import model_dir
    from dist_export.api import export
    from dist_export.verify import verify_export

    src = model_dir("synthetic:llama-tiny")
    export(src, str(tmp_path / "o"), recipe="int4-w4a16-mse")
    report = verify_export(str(tmp_path / "o"), source_dir=src)
    assert report["ok"] and report["recomputed"] > 0, report
