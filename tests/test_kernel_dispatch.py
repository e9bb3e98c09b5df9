"""The registry sends CUDA tensors to the formats' GPU kernels and CPU tensors to the torch path, falls back to
torch where a kernel does not apply, and the dispatched result equals the torch path bit for bit (folds, real
quant, MSE search, ties included).

The dispatch rules run everywhere (CI included) with stand-in kernels; the bit-exact checks run the real kernels
compiled on a CUDA GPU, else in Triton's interpreter where Triton is installed, else skip.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize, registry
from dist_export.numerics import spec as numeric_spec
from dist_export.numerics import kernels as kernels_mod
from dist_export.numerics.kernels.formats import FormatKernels
from dist_export.numerics.mse import search_block_amax

CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def test_cpu_tensors_never_take_a_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels_mod.enabled(torch.zeros(4, 4))
    for name in ("fp8", "int8", "int4", "nvfp4"):
        assert registry.get_format(name).kernels is not None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_kernels_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv("DIST_EXPORT_KERNELS", "0")
    assert not kernels_mod.enabled(torch.zeros(4, 4, device="cuda"))


def _with_stand_in(monkeypatch, fmt_name, **ops):
    """Register `fmt_name` with stand-in kernels and make every tensor eligible; returns the call log."""
    calls = []

    def spy(op, result):
        def fn(*args):
            calls.append(op)
            return result(*args)
        return fn

    stand_in = FormatKernels(**{op: spy(op, fn) for op, fn in ops.items()})
    fmt = registry.get_format(fmt_name)
    monkeypatch.setitem(numeric_spec._FORMATS, fmt_name, dataclasses.replace(fmt, kernels=stand_in))
    monkeypatch.setattr(kernels_mod, "enabled", lambda t: True)
    return calls


def test_dispatch_uses_the_kernel_and_falls_back_when_it_declines(monkeypatch):
    w = torch.randn(8, 32).to(torch.bfloat16)
    spec = QuantSpec("fp8", "channel")
    amax = compute_amax(w, spec)
    want = fake_quant(w, spec, amax)
    marker = torch.full_like(w, 3.0)
    calls = _with_stand_in(monkeypatch, "fp8", fake_quant=lambda *a: marker, quantize=lambda *a: None)
    assert fake_quant(w, spec, amax) is marker
    assert torch.equal(quantize(w, spec, amax)["qdata"].view(torch.uint8),
                       registry.get_format("fp8").quantize(w.float(), spec, amax)["qdata"].view(torch.uint8))
    assert calls == ["fake_quant", "quantize"]
    monkeypatch.setitem(numeric_spec._FORMATS, "fp8", dataclasses.replace(registry.get_format("fp8"),
                                                                     kernels=FormatKernels()))
    assert torch.equal(fake_quant(w, spec, amax), want)  # no kernel for the op: torch path


def test_search_dispatch_and_fallback(monkeypatch):
    w = torch.randn(4, 32).to(torch.bfloat16)
    spec = QuantSpec("int4", "group", 16, "mse", 8)
    amax = compute_amax(w, spec)
    want = search_block_amax(w, spec, amax)
    calls = _with_stand_in(monkeypatch, "int4", search=lambda *a: None)
    ticks = []
    got = search_block_amax(w, spec, amax, tick=lambda: ticks.append(1))
    assert calls == ["search"] and torch.equal(got[0], want[0]) and ticks  # declined: torch path ran
    calls = _with_stand_in(monkeypatch, "int4", search=lambda w_, s, a: (a * 0.5, None))
    assert torch.equal(search_block_amax(w, spec, amax)[0], amax * 0.5)


# ---- the real kernels through the registry ----

needs_kernels = pytest.mark.skipif(not (CUDA or HAVE_TRITON), reason="needs Triton (CUDA, or its interpreter)")
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def dispatched(monkeypatch):
    """On CUDA the real dispatch; on a CPU with Triton, the interpreter standing in for the GPU."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(kernels_mod, "enabled", lambda t: True)


def _bits(t):
    t = t.cpu().contiguous()
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


CASES = [("fp8", "block", 16), ("fp8", "tensor", None), ("int4", "group", 16), ("int8", "channel", None),
         ("nvfp4", "group", 16)]


@needs_kernels
@pytest.mark.parametrize("fmt,gran,bs", CASES)
def test_registry_kernels_equal_torch_path(fmt, gran, bs, dispatched):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(24, 80, generator=g) * torch.logspace(-4, 1, 80)).to(torch.bfloat16)
    w[1] = 0.0
    spec = QuantSpec(fmt, gran, bs)
    amax = compute_amax(w, spec)
    with torch.no_grad():
        want = registry.get_format(fmt).fake_quant(w.float(), spec, amax).to(w.dtype)
        got = fake_quant(w.to(DEV), spec, amax.to(DEV))
        assert torch.equal(_bits(got).view(torch.int16), want.view(torch.int16))
        t = w.t()  # rows not contiguous: copied before the kernel
        assert torch.equal(fake_quant(t.to(DEV), spec, compute_amax(t, spec).to(DEV)).cpu(),
                           registry.get_format(fmt).fake_quant(t.float(), spec, compute_amax(t, spec)).to(t.dtype))
        if registry.get_format(fmt).quantize is not None:
            want_q = registry.get_format(fmt).quantize(w.float(), spec, amax)
            got_q = quantize(w.to(DEV), spec, amax.to(DEV))
            for k in want_q:
                assert torch.equal(_bits(got_q[k]), _bits(want_q[k])), k


@needs_kernels
@pytest.mark.parametrize("fmt,gran,bs", [("nvfp4", "group", 16), ("int4", "group", 24), ("int8", "channel", None)])
def test_registry_search_equals_torch_path_with_ties(fmt, gran, bs, dispatched, monkeypatch):
    """Few distinct values: many blocks have tied candidates; both paths pick the first (largest amax)."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randint(-3, 4, (12, 48), generator=g).float() * 0.5).to(torch.bfloat16)
    spec = QuantSpec(fmt, gran, bs, "mse", 16)
    amax = compute_amax(w, spec)
    got = search_block_amax(w.to(DEV), spec, amax.to(DEV))
    monkeypatch.setattr(kernels_mod, "enabled", lambda t: False)
    want = search_block_amax(w, spec, amax)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None:
            assert torch.equal(a.cpu().view(torch.int32), b.view(torch.int32))


def test_deferred_finite_checks_record_only_cuda_tensors_and_refuse_by_name():
    from dist_export.numerics.blocks import check_finite, deferred_finite_checks, raise_if_nonfinite

    w = torch.ones(3, 4)
    w[0, 0] = float("nan")
    with deferred_finite_checks() as log:
        with pytest.raises(ValueError, match="w: weight has 1 NaN and 0 inf"):
            check_finite(w, "w")  # a CPU tensor: checked at once
    assert log == []
    raise_if_nonfinite(["a", "b"], torch.tensor([[0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="b: weight has 0 NaN and 2 inf values; fix the source checkpoint"):
        raise_if_nonfinite(["a", "b"], torch.tensor([[0, 0], [0, 2]]))
    if CUDA:
        with deferred_finite_checks() as log:
            check_finite(w.cuda(), "w")  # recorded, not raised
        assert [n for n, _ in log] == ["w"] and log[0][1].tolist() == [1, 0]
