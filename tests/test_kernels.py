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
SHAPES = [(40, 72), (3, 16), (1, 1), (5, 33), (16, 128)] + ([(1000, 1030), (256, 4096)] if BIG else [])
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


@pytest.mark.parametrize("fmt,gran,bs,shape", [
    ("nvfp4", "group", 16, (6, 20)), ("nvfp4", "group", 16, (5, 10)),  # packed bytes one by one (width % 8 != 0)
    ("nvfp4", "group", 16, (9, 24)),  # words of 8 codes, the last block half full
    ("int4", "group", 256, (5, 600)), ("int8", "group", 200, (3, 450)),  # groups wider than a tile: cut in chunks
    ("fp8", "block", 256, (300, 520)), ("int4", "group", 130, (2, 300)),  # 130 -> chunks of 65, padded to 128
    ("int8", "channel", None, (3, 300)), ("fp8", "tensor", None, (17, 260))])
def test_ragged_widths_and_blocks_wider_than_a_tile(fmt, gran, bs, shape):
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize

    spec = QuantSpec(fmt, gran, bs)
    ks = kernels_of(fmt)
    for kind in ("random", "huge"):
        w = make(kind, shape, torch.bfloat16, seed=shape[1])
        amax = compute_amax(w, spec)
        what = f"{fmt}/{gran}/{bs} {kind} {shape}"
        assert_same(ks.fake_quant(w.to(DEV), spec, amax.to(DEV)), fake_quant(w, spec, amax), what)
        if ks.quantize is not None:
            try:
                want = quantize(w, spec, amax)
            except ValueError:
                continue  # the refusal itself is tested in test_fold_and_encode_bit_exact
            got = ks.quantize(w.to(DEV), spec, amax.to(DEV))
            for key in want:
                assert_same(got[key], want[key], f"{what} {key}")


def test_nvfp4_fold_with_searched_block_amax_and_strided_input():
    """The searched per-block amax path, and a non-contiguous (sliced) weight."""
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize

    spec = QuantSpec("nvfp4", "group", 16)
    full = make("random", (30, 97), torch.bfloat16)
    w = full[:, 1:81]  # row stride 97, an odd start: the encoder's words need a copy
    amax = compute_amax(w, spec)
    g = torch.Generator().manual_seed(1)
    bam = compute_amax(w, QuantSpec("int8", "group", 16)) * (0.5 + 0.5 * torch.rand(30, 5, generator=g))
    assert_same(_kernels().NVFP4.fake_quant(w.to(DEV), spec, amax.to(DEV), bam.to(DEV)),
                fake_quant(w, spec, amax, bam), "nvfp4 block_amax")
    got, want = _kernels().NVFP4.quantize(w.to(DEV), spec, amax.to(DEV), bam.to(DEV)), quantize(w, spec, amax, bam)
    for key in want:
        assert_same(got[key], want[key], key)


@pytest.mark.parametrize("fmt,gran,bs,shape", [("fp8", "block", 16, (32, 48)), ("int4", "group", 16, (16, 128)),
                                               ("nvfp4", "group", 16, (16, 128)), ("nvfp4", "group", 16, (5, 20))])
def test_int64_offsets_give_the_same_bits(fmt, gran, bs, shape, monkeypatch):
    """The int64-offset variant (weights past 2**31 elements) on small shapes: the int32 limit lowered to 1."""
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize
    from dist_export.numerics.kernels import fold

    monkeypatch.setattr(fold, "INT32_LIMIT", 1)
    spec = QuantSpec(fmt, gran, bs)
    ks = kernels_of(fmt)
    w = make("random", shape, torch.bfloat16, seed=3)
    amax = compute_amax(w, spec)
    assert_same(ks.fake_quant(w.to(DEV), spec, amax.to(DEV)), fake_quant(w, spec, amax), "fold")
    if ks.quantize is not None:
        got, want = ks.quantize(w.to(DEV), spec, amax.to(DEV)), quantize(w, spec, amax)
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

    # big shapes stay ragged but modest: the CPU reference searches 64 candidates in double sums (777 x 1024 NVFP4
    # took 83 s on 2 cores, and four such cases outran a 330 s GPU run)
    shapes = [(12, 48), (3, 40)] + ([(131, 1024), (64, 4096)] if BIG else [])
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
    from dist_export.numerics.mse import search_blocks, fold_candidates, candidate_ratios
    from dist_export.numerics.pairwise import pairwise_sum

    x = w.float()
    xb, bs = search_blocks(x, spec)
    base = reduce_abs_max(x, "group", bs) if spec.fmt == "nvfp4" else amax.float()
    cand = base.unsqueeze(0) * candidate_ratios(spec.mse_candidates, x.device).view(-1, 1, 1)
    return cand, pairwise_sum((fold_candidates(xb, cand, spec, amax) - xb.unsqueeze(0)).double().square())


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


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from dist_export.numerics.kernels.jitlib import e2m1_code, e2m1_index, e2m1_round, e2m1_value

    @triton.jit
    def _e2m1_probe(a_ptr, code_ptr, val_ptr, old_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=0.0)
        tl.store(code_ptr + offs, e2m1_code(a), mask=m)
        tl.store(val_ptr + offs, e2m1_round(a), mask=m)
        tl.store(old_ptr + offs, e2m1_value(e2m1_index(a)), mask=m)


def test_e2m1_rounding_on_the_bits_equals_the_threshold_table():
    """e2m1_code / e2m1_round (rounding on the float's bits) give the threshold table's code and value
    (nvfp4.round_e2m1_magnitude) for float32 values from 0 up to past 6 (every 97th bit pattern below 16 (31st on a GPU), where
    the 2**23 trick and the mantissa rounding switch), every threshold and its neighbours a few ulps away,
    subnormals, huge values, inf and NaN."""
    from dist_export.numerics.nvfp4 import E2M1_VALUES, round_e2m1_magnitude

    stride = 31 if CUDA else 97
    pats = torch.arange(0, 0x41800000, stride, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 1e30,
                             3.4e38, float("inf"), float("nan"), 1e-45, 1e-38])
    near = (specials[:17].view(torch.int32).unsqueeze(1) + torch.arange(-3, 4, dtype=torch.int32)).reshape(-1)
    a = torch.cat([pats.view(torch.float32), specials, near.clamp(min=0).view(torch.float32)])
    want_val = round_e2m1_magnitude(a)
    want_code = torch.searchsorted(torch.tensor(E2M1_VALUES), want_val).to(torch.int32)
    n = a.numel()
    dev = a.to(DEV)
    code = torch.empty(n, dtype=torch.int32, device=DEV)
    val, old = torch.empty(n, device=DEV), torch.empty(n, device=DEV)
    block = 1024 if CUDA else 1 << 16
    _e2m1_probe[(-(-n // block),)](dev, code, val, old, n, BLOCK=block)
    assert_same(old, want_val, "threshold-table kernel")
    assert_same(val, want_val, "e2m1_round")
    assert_same(code, want_code, "e2m1_code")


if HAVE_TRITON:
    from dist_export.numerics.kernels.jitlib import div_by, divisor_parts, fma_rn

    @triton.jit
    def _div_probe(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=1.0)
        dm, y, ip2 = divisor_parts(tl.load(b_ptr + offs, mask=m, other=1.0))
        tl.store(out_ptr + offs, div_by(a, dm, y, ip2), mask=m)

    @triton.jit
    def _fma_probe(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a, b, c = tl.load(a_ptr + offs, mask=m), tl.load(b_ptr + offs, mask=m), tl.load(c_ptr + offs, mask=m)
        tl.store(out_ptr + offs, fma_rn(a, b, c), mask=m)


def _run_probe(kernel, *inputs):
    n = inputs[0].numel()
    out = torch.empty(n, device=DEV)
    block = 1024 if CUDA else 1 << 16
    kernel[(-(-n // block),)](*(t.to(DEV) for t in inputs), out, n, BLOCK=block, enable_fp_fusion=False)
    return out.cpu()


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def test_div_by_is_the_ieee_division_for_int_codes():
    """jitlib.div_by (reciprocal once per divisor, then multiply-adds) against torch's IEEE division on the CPU:
    every INT numerator -128..127 (signed zeros aside: callers keep -0.0 themselves) by divisors of every
    exponent the INT scales take; on a GPU every odd numerator by all 2**23 significands (the quotient's bits do
    not depend on the divisor's exponent nor on a power of two in the numerator, so that is every case)."""
    g = torch.Generator().manual_seed(7)
    if CUDA:
        sig = torch.arange(1 << 23, dtype=torch.int64)
        nums = range(1, 128, 2)
    else:
        sig = torch.cat([torch.randint(0, 1 << 23, (2000,), generator=g), torch.tensor([0, 1, (1 << 23) - 1,
                                                                                            (1 << 23) - 2])])
        nums = range(-128, 128)
    batches = [[q] for q in nums] if CUDA else [list(nums)]  # the interpreter: one launch
    for qs in batches:
        exp = torch.randint(1, 127 + 32, (len(qs), len(sig)), generator=g)  # scale = maxb / amax: 2**-126 .. 2**31
        b = _f32((exp << 23) | sig).reshape(-1)
        a = torch.tensor(qs, dtype=torch.float32).repeat_interleave(len(sig))
        keep = a != 0
        got, want = _run_probe(_div_probe, a[keep], b[keep]), a[keep] / b[keep]
        assert_same(got, want, f"numerators {qs[0]}..{qs[-1]}")


def test_div_by_is_the_ieee_division_near_e2m1_thresholds_and_across_ranges():
    """The NVFP4 division |x| / sq: random dividends and divisors over the whole range the kernels use
    (sq in [1e-5, 5.7e37]; quotients from 2**-100 to past float32's largest, i.e. inf), quotients a few ulps from
    each E2M1 threshold, exact quotients, and divisors with an all-ones significand."""
    g = torch.Generator().manual_seed(8)
    n = 1 << 22 if CUDA else 1 << 15
    b = torch.exp(torch.empty(n).uniform_(-11.5, 86.9, generator=g))  # 1e-5 .. 5.7e37
    b[:64] = _f32(torch.randint(100, 230, (64,), generator=g) << 23 | 0x7FFFFF)  # significand all ones
    b[64:128] = torch.tensor(2.0) ** torch.randint(-16, 120, (64,), generator=g).float()  # exact reciprocals
    t = torch.tensor([0.25, 0.75, 1.0, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = t[torch.randint(0, len(t), (n // 2,), generator=g)]
    near = _f32(near.view(torch.int32) + torch.randint(-4, 5, (n // 2,), generator=g, dtype=torch.int32))
    a = torch.cat([(near * b[: n // 2]).float(), b[n // 2:] * torch.exp(torch.empty(n - n // 2).uniform_(-69, 88,
                                                                                                       generator=g))])
    a[:32] = b[:32] * 3.0  # exact quotients where representable
    a[-64:], b[-64:] = 3.0e38, torch.logspace(-5, 0, 64)  # quotients past the largest float32: inf
    a[-66:-64], b[-66:-64] = 3.4028234663852886e38, torch.tensor([1.0, 1.0 - 2.0**-24])  # its last finite / inf
    a = a.abs()
    q = a.double() / b.double()
    ok = torch.isfinite(a) & (q >= 2.0**-100)
    got, want = _run_probe(_div_probe, a[ok], b[ok]), a[ok] / b[ok]
    assert_same(got, want, "a / b")
    assert torch.isinf(want).any() and ((want > 0.2) & (want < 6.5)).float().mean() > 0.4  # both regimes met


def _rn32(x) -> float:
    """Exact rational x rounded to the nearest float32 (ties to even), subnormals and overflow included."""
    import fractions
    import math

    x = fractions.Fraction(x)
    if x == 0:
        return 0.0
    s, x = (-1.0 if x < 0 else 1.0), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    e = e - 1 if x < fractions.Fraction(2) ** e else e  # 2**e <= x < 2**(e+1)
    e = max(e, -126)
    scaled = x * fractions.Fraction(2) ** (23 - e)
    k = math.floor(scaled)
    rem = scaled - k
    k += 1 if rem > fractions.Fraction(1, 2) or (rem == fractions.Fraction(1, 2) and k % 2) else 0
    v = math.ldexp(k, e - 23)
    return s * (math.inf if v >= 2.0**128 else v)


def test_fma_rn_rounds_once():
    """jitlib.fma_rn (tl.fma on a GPU, an emulation in the interpreter) against a*b+c computed exactly in
    rationals and rounded once: random operands, products that cancel c to a few bits, halfway cases."""
    import fractions

    g = torch.Generator().manual_seed(9)
    n = 4000
    a = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-30, 30, generator=g))
    b = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-30, 30, generator=g))
    c = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-60, 60, generator=g))
    c[: n // 2] = -(a[: n // 2] * b[: n // 2])  # cancellation: the result is the product's rounding error
    c[n // 2: n // 2 + 500] = -(a[n // 2: n // 2 + 500] * b[n // 2: n // 2 + 500]) * (1 + 2.0**-23)
    got = _run_probe(_fma_probe, a, b, c)
    want = torch.tensor([_rn32(fractions.Fraction(x) * fractions.Fraction(y) + fractions.Fraction(z))
                         for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())], dtype=torch.float32)
    assert_same(got, want, "fma")


@pytest.mark.parametrize("fmt,gran,bs", [("int4", "group", 16), ("int8", "channel", None), ("nvfp4", "group", 16),
                                         ("fp8", "block", 16)])
def test_float32_weights_at_the_ends_of_the_range(fmt, gran, bs):
    """float32 weights near the largest float32 (INT quotients overflow to inf as the reference's division does,
    scales near the smallest normal) and subnormal weights: fold, encoder and search give the torch bits."""
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize
    from dist_export.numerics.mse import search_block_amax

    g = torch.Generator().manual_seed(10)
    w = torch.randn(8, 48, generator=g)
    w[:3] *= 3.0e38 / w[:3].abs().max()  # rows of huge values (amax up to 3e38)
    w[3:5] *= 1e-39  # subnormals
    w[5] = torch.tensor(3.4028234663852886e38)
    spec = QuantSpec(fmt, gran, bs)
    amax = compute_amax(w, spec)
    ks = kernels_of(fmt)
    assert_same(ks.fake_quant(w.to(DEV), spec, amax.to(DEV)), fake_quant(w, spec, amax), f"{fmt} fold")
    if ks.quantize is not None:
        try:
            want = quantize(w, spec, amax)
        except ValueError:
            want = None
        if want is not None:
            got = ks.quantize(w.to(DEV), spec, amax.to(DEV))
            for key in want:
                assert_same(got[key], want[key], f"{fmt} {key}")
    if ks.search is not None and fmt != "fp8":
        mspec = QuantSpec(fmt, gran, bs, "mse", 8)
        got, want = ks.search(w.to(DEV), mspec, amax.to(DEV)), search_block_amax(w, mspec, amax)
        for x, y in zip(got, want):
            if y is not None:
                assert_same(x, y, f"{fmt} search")


@pytest.mark.parametrize("ratios", ["wide", "shuffled", "default"])
def test_nvfp4_search_per_code_and_per_candidate_paths(ratios):
    """The NVFP4 search folds a block once per E4M3 code its candidates fall on; ratios spanning more codes than
    its slots (wide) or not descending (shuffled) take the loop over every candidate. Both against the torch
    pieces of the reference (per-candidate errors, first minimum), ties included (few distinct values)."""
    from dist_export.numerics import QuantSpec, compute_amax
    from dist_export.numerics.kernels.search import search_nvfp4
    from dist_export.numerics.mse import search_blocks, fold_candidates, candidate_ratios
    from dist_export.numerics.nvfp4 import global_scale
    from dist_export.numerics.pairwise import pairwise_sum

    g = torch.Generator().manual_seed(12)
    r = {"wide": torch.linspace(1.0, 0.05, 24), "default": candidate_ratios(24, "cpu"),
         "shuffled": candidate_ratios(24, "cpu")[torch.randperm(24, generator=g)]}[ratios]
    w = torch.cat([torch.randn(6, 48, generator=g) * 0.02,
                   torch.randint(-3, 4, (6, 48), generator=g).float() * 0.5]).to(torch.bfloat16)
    spec = QuantSpec("nvfp4", "group", 16, "mse", 24)
    amax = compute_amax(w, spec)
    xb, _ = search_blocks(w.float(), spec)
    cand = xb.abs().amax(dim=-1).unsqueeze(0) * r.view(-1, 1, 1)
    err = pairwise_sum((fold_candidates(xb, cand, spec, amax) - xb.unsqueeze(0)).double().square())
    want = cand.gather(0, torch.argmin(err, dim=0, keepdim=True)).squeeze(0)
    got = search_nvfp4(w.to(DEV), global_scale(amax).to(DEV), r.to(DEV))
    assert_same(got, want, f"{ratios} ratios")
