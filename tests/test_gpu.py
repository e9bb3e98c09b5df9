"""CUDA and CPU give the same bits (numerics, MSE search, whole exports on one and two GPUs).
Skipped cleanly where no GPU is visible (CI)."""
from __future__ import annotations

import pytest
import torch

from helpers import folder_hashes, model_dir, run_cli, run_torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPECS = [("fp8", "tensor", None), ("fp8", "channel", None), ("fp8", "block", 128), ("int8", "channel", None),
         ("int4", "group", 128), ("int4", "group", 32), ("nvfp4", "group", 16)]


@pytest.mark.parametrize("fmt,gran,bs", SPECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_numerics_bit_exact_with_cpu(fmt, gran, bs, dtype):
    from dist_export.numerics import QuantSpec, compute_amax, fake_quant, quantize

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(1000, 1030, generator=g) * torch.logspace(-3, 2, 1030)).to(dtype)
    spec = QuantSpec(fmt, gran, bs)
    a_cpu, a_gpu = compute_amax(w, spec), compute_amax(w.cuda(), spec)
    assert torch.equal(a_cpu, a_gpu.cpu())
    assert torch.equal(fake_quant(w, spec, a_cpu), fake_quant(w.cuda(), spec, a_gpu).cpu())
    if fmt in ("fp8", "nvfp4"):
        q_cpu, q_gpu = quantize(w, spec, a_cpu), quantize(w.cuda(), spec, a_gpu)
        for k in q_cpu:
            assert torch.equal(q_cpu[k].view(torch.uint8) if q_cpu[k].dtype == torch.float8_e4m3fn else q_cpu[k],
                               (q_gpu[k].view(torch.uint8) if q_gpu[k].dtype == torch.float8_e4m3fn else q_gpu[k]).cpu()), k


@pytest.mark.parametrize("fmt,bs", [("nvfp4", 16), ("int4", 128)])
def test_cuda_mse_search_matches_cpu(fmt, bs):
    from dist_export.numerics import QuantSpec, compute_amax
    from dist_export.numerics.mse import search_block_amax

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(777, 1024, generator=g) * 0.02).to(torch.bfloat16)
    spec = QuantSpec(fmt, "group", bs, "mse", 64)
    a = compute_amax(w, spec)
    cpu = search_block_amax(w, spec, a)
    gpu = search_block_amax(w.cuda(), spec, a.cuda())
    for c, d in zip(cpu, gpu):
        if c is not None:
            assert torch.equal(c, d.cpu())


@pytest.mark.parametrize("model,recipe,fmt", [("synthetic:llama-small", "nvfp4-mse", "vllm-fq"),
                                              ("synthetic:qwen3-moe-small", "fp8-block", "fp8-block"),
                                              ("synthetic:qwen3-moe-small", "int4-w4a16", "vllm-fq")])
def test_gpu_exports_equal_cpu_exports(model, recipe, fmt, tmp_path):
    """One GPU, and two GPUs under torchrun and under --nproc-per-node, write the CPU export's bytes (the
    pipeline's pinned rings, copy stream and in-pipeline shared amax included)."""
    src = model_dir(model)
    run_cli("export", "--model", src, "--recipe", recipe, "--format", fmt, "--device", "cpu",
            "--max-shard-size", "20MB", "--out", str(tmp_path / "cpu"))
    run_cli("export", "--model", src, "--recipe", recipe, "--format", fmt, "--device", "cuda",
            "--max-shard-size", "20MB", "--out", str(tmp_path / "gpu1"))
    ref = folder_hashes(str(tmp_path / "cpu"))
    assert folder_hashes(str(tmp_path / "gpu1")) == ref
    if torch.cuda.device_count() >= 2:
        run_torchrun(2, "export", "--model", src, "--recipe", recipe, "--format", fmt, "--device", "cuda",
                     "--max-shard-size", "20MB", "--out", str(tmp_path / "gpu2"))
        assert folder_hashes(str(tmp_path / "gpu2")) == ref
        run_cli("export", "--model", src, "--recipe", recipe, "--format", fmt, "--device", "cuda",
                "--max-shard-size", "20MB", "--nproc-per-node", "2", "--out", str(tmp_path / "gpu2-builtin"))
        assert folder_hashes(str(tmp_path / "gpu2-builtin")) == ref
