"""GPU kernels (dist_export/numerics/kernels) give the torch CPU path's bits: folds, real-quant encoders and the
MSE scale search, for every format and granularity, on random, ragged, all-zero, tiny, huge-range and signed-zero
inputs, and ties in the search resolve to the first candidate.

Runs compiled on a CUDA GPU; on a CPU machine with Triton installed it runs the same kernels in Triton's
interpreter (small shapes); skipped where Triton is absent (CI tests the torch path in test_numerics/test_mse).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. first imported
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton (compiled on CUDA, else its interpreter)")
DEV = "cuda" if CUDA else "cpu"
BIG = CUDA  # the interpreter is slow: large shapes only on a GPU


def _kernels():
    from dist_export.numerics.kernels import formats

    return formats


def make(kind: str, shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r, c = shape
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    w = torch.randn(shape, generator=g)
    if kind == "random":
        w = w * torch.logspace(-3, 1, c)
    elif kind == "tiny":
        w = w * 1e-7 if dtype == torch.float16 else w * 1e-30
    elif kind == "huge":
        lo, hi = (-6, 4) if dtype == torch.float16 else (-30, 30)
        w = w * torch.logspace(lo, hi, r * c).reshape(shape)[torch.randperm(r, generator=g)]
    w = w.to(dtype)
    w[0, : min(5, c)] = -0.0
    if r > 2:
        w[2] = 0.0  # an all-zero row
    return w


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.dtype in (torch.float8_e4m3fn, torch.uint8):
        return t.view(torch.uint8)
    if t.element_size() == 2:
        return t.view(torch.int16)
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = bits(got) != bits(want)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at {diff.nonzero()[0].tolist()}"


KINDS = ["random", "zero", "tiny", "huge"]
SHAPES = [(40, 72), (3, 16), (1, 1), (5, 33)] + ([(1000, 1030), (256, 4096)] if BIG else [])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLK = 128 if BIG else 16
FOLD_SPECS = [("fp8", "tensor", None), ("fp8", "channel", None), ("fp8", "block", BLK), ("fp8", "block", 24),
              ("int8", "tensor", None), ("int8", "channel", None), ("int8", "group", 32),
              ("int4", "channel", None), ("int4", "group", BLK), ("int4", "group", 24), ("nvfp4", "group", 16)]


def kernels_of(fmt):
    k = _kernels()
    return {"fp8": k.FP8, "int8": k.INT, "int4": k.INT, "nvfp4": k.NVFP4}[fmt]


@pytest.mark.parametrize("fmt,gran,bs", FOLD_SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fold_and_encode_bit_exact(fmt, gran, bs, shape):
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize

    spec = QuantSpec(fmt, gran, bs)
    ks = kernels_of(fmt)
    for kind in KINDS:
        for dtype in DTYPES:
            w = make(kind, shape, dtype, seed=shape[0])
            amax = compute_amax(w, spec)
            what = f"{fmt}/{gran}/{bs} {kind} {dtype} {shape}"
            assert_same(ks.fake_quant(w.to(DEV), spec, amax.to(DEV)), fake_quant(w, spec, amax), what)
            if ks.quantize is not None and shape[1] % 2 == 0:
                try:
                    want = quantize(w, spec, amax)
                except ValueError as e:  # e.g. NVFP4 blocks underflowing E4M3 in a huge-range tensor
                    with pytest.raises(ValueError) as got_e:
                        ks.quantize(w.to(DEV), spec, amax.to(DEV))
                    assert str(got_e.value) == str(e)
                    continue
                got = ks.quantize(w.to(DEV), spec, amax.to(DEV))
                assert sorted(got) == sorted(want)
                for key in want:
                    assert_same(got[key], want[key], f"{what} {key}")


def test_nvfp4_fold_with_searched_block_amax_and_strided_input():
    """The searched per-block amax path, and a non-contiguous (sliced) weight."""
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize

    spec = QuantSpec("nvfp4", "group", 16)
    full = make("random", (30, 96), torch.bfloat16)
    w = full[:, :80]  # row stride 96
    amax = compute_amax(w, spec)
    g = torch.Generator().manual_seed(1)
    bam = compute_amax(w, QuantSpec("int8", "group", 16)) * (0.5 + 0.5 * torch.rand(30, 5, generator=g))
    assert_same(_kernels().NVFP4.fake_quant(w.to(DEV), spec, amax.to(DEV), bam.to(DEV)),
                fake_quant(w, spec, amax, bam), "nvfp4 block_amax")
    got, want = _kernels().NVFP4.quantize(w.to(DEV), spec, amax.to(DEV), bam.to(DEV)), quantize(w, spec, amax, bam)
    for key in want:
        assert_same(got[key], want[key], key)


def test_nvfp4_encoder_refuses_what_the_torch_path_refuses():
    """A block whose scale underflows E4M3 while the fold keeps nonzero values cannot be stored bit-exactly."""
    from dist_export.numerics import QuantSpec, quantize

    spec = QuantSpec("nvfp4", "group", 16)
    w = torch.ones(2, 32)
    amax, bam = torch.tensor(1e6), torch.full((2, 2), 1e-30)
    with pytest.raises(ValueError, match="cannot be stored as real NVFP4") as want:
        quantize(w, spec, amax, bam)
    with pytest.raises(ValueError) as got:
        _kernels().NVFP4.quantize(w.to(DEV), spec, amax.to(DEV), bam.to(DEV))
    assert str(got.value) == str(want.value)


SEARCH_SPECS = [("nvfp4", "group", 16), ("int4", "group", 32), ("int4", "group", 24), ("int8", "group", 16),
                ("int4", "channel", None), ("int8", "tensor", None)] + ([("int4", "group", 128)] if BIG else [])


@pytest.mark.parametrize("fmt,gran,bs", SEARCH_SPECS)
@pytest.mark.parametrize("kind", KINDS)
def test_mse_search_bit_exact(fmt, gran, bs, kind):
    from dist_export.numerics import QuantSpec, compute_amax
    from dist_export.numerics.mse import search_block_amax

    shapes = [(12, 48), (3, 40)] + ([(777, 1024), (64, 4096)] if BIG else [])
    k = 64 if BIG else 12
    spec = QuantSpec(fmt, gran, bs, "mse", k)
    for shape in shapes:
        if gran != "group" and shape[1] > 256:
            continue  # searched by the torch path (see kernels.search.MAX_INT_BLOCK)
        w = make(kind, shape, torch.bfloat16, seed=shape[1])
        amax = compute_amax(w, spec)
        want = search_block_amax(w, spec, amax)
        got = kernels_of(fmt).search(w.to(DEV), spec, amax.to(DEV))
        for g, e in zip(got, want):
            assert (g is None) == (e is None)
            if e is not None:
                assert_same(g, e, f"{fmt}/{gran}/{bs} {kind} {shape}")


def _candidate_errors(w, spec, amax):
    """Per-candidate errors [K, rows, blocks] by the torch reference's own pieces (fixed-order sums)."""
    from dist_export.numerics.blocks import reduce_abs_max
    from dist_export.numerics.mse import _blocks, _fold_candidates, candidate_ratios
    from dist_export.numerics.nvfp4 import global_scale
    from dist_export.numerics.pairwise import pairwise_sum

    x = w.float()
    xb, bs = _blocks(x, spec)
    base = reduce_abs_max(x, "group", bs) if spec.fmt == "nvfp4" else amax.float()
    gs = global_scale(amax) if spec.fmt == "nvfp4" else None
    cand = base.unsqueeze(0) * candidate_ratios(spec.mse_candidates, x.device).view(-1, 1, 1)
    return cand, pairwise_sum((_fold_candidates(xb, cand, spec, gs) - xb.unsqueeze(0)).double().square())


@pytest.mark.parametrize("fmt,bs", [("nvfp4", 16), ("int4", 16)])
def test_search_ties_pick_the_first_candidate(fmt, bs):
    """Exact ties happen: NVFP4 neighbouring candidates often round to the same E4M3 block scale and fold
    identically; INT groups whose amax is at most 2**-24 fold to zeros for every candidate (equal, nonzero
    errors). Both paths must take the first of the tied minima."""
    from dist_export.numerics import QuantSpec, compute_amax
    from dist_export.numerics.mse import search_block_amax

    spec = QuantSpec(fmt, "group", bs, "mse", 32)
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-3, 4, (16, 64), generator=g).to(torch.float32) * 0.5  # few distinct values
    if fmt != "nvfp4":
        w[::2] *= 2.0**-26  # every candidate folds these groups to zeros
    w = w.to(torch.bfloat16)
    amax = compute_amax(w, spec)
    cand, err = _candidate_errors(w, spec, amax)
    minimum = err.min(dim=0, keepdim=True).values
    tied = (err == minimum).sum(dim=0)
    assert (tied >= 2).float().mean() > 0.4  # the test input does tie
    first = cand.gather(0, (err == minimum).to(torch.uint8).argmax(dim=0, keepdim=True)).squeeze(0)
    got = kernels_of(fmt).search(w.to(DEV), spec, amax.to(DEV))
    want = search_block_amax(w, spec, amax)
    idx = 1 if fmt == "nvfp4" else 0
    assert_same(want[idx], first, "torch path")
    assert_same(got[idx], first, "kernel")
