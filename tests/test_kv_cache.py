"""KV-cache quantization (recipe `kv_cache: fp8`): calibrated K/V amax and the scales every format writes.

1. Calibration records, per attention layer, max|key| and max|value| as the attention receives them (after RoPE
   and Qwen3's k_norm): checked against an independent reference that records what torch's
   scaled_dot_product_attention receives under transformers' SDPA attention, on the same token samples.
2. Each format writes what its consumer reads (names from vLLM 0.32's and ModelOpt 0.47's loaders/exporters):
   compressed-tensors `<attn>.k_scale` F32 [1] + `kv_cache_scheme`; modelopt `<attn>.k_proj.k_scale` F32 [] +
   `kv_cache_quant_algo: FP8` / `kv_cache_scheme`; vllm-fq `<attn>.k_bmm_quantizer` state with its amax and a
   `*[kv]_bmm_quantizer` quant_cfg entry. Scale = amax / 448 exactly; `verify --source` recomputes them.
3. Bad inputs: an unknown kv_cache value, a format that cannot carry the scales, an excluded k_proj.
4. Where ModelOpt is installed (the ModelOpt venv of .ci/run): ModelOpt's own convert + restore of the vllm-fq
   state file enables the HF attention's k/v_bmm_quantizers with our amax, and ModelOpt's quantized attention
   equals the formula on the layer's key states.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

FP8_MAX = 448.0


def _recipe(tmp_path, name="fp8-pc-pt-kv", exclude=None) -> str:
    path = tmp_path / f"{name}.yaml"
    lines = [f"name: {name}", "rules:", '  - match: ["*"]', "    weight: {format: fp8, granularity: channel}",
             "    input: {format: fp8, granularity: token, dynamic: true}", "kv_cache: fp8"]
    if exclude:
        lines.append(f"exclude: {json.dumps(exclude)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _reference_kv_amax(model_dir: str, samples) -> dict[str, float]:
    """max|key| / max|value| per attention layer, recorded by patching torch's scaled_dot_product_attention under
    transformers' SDPA attention (the same arithmetic as calibration; the i-th call of a forward is layer i)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    layers = model.config.num_hidden_layers
    seen: dict[str, float] = {}
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        layer = len(calls) % layers
        calls.append(layer)
        for role, t in (("k", key), ("v", value)):
            q = f"model.layers.{layer}.self_attn.{role}_bmm_quantizer"
            seen[q] = max(seen.get(q, 0.0), t.detach().float().abs().max().item())
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            for ids in samples:
                model(torch.tensor([ids]))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == layers * len(samples)
    return seen


@pytest.mark.parametrize("model", ["synthetic:llama-tiny", "synthetic:qwen3-tiny"])
def test_calibration_records_kv_amax_after_rope(model, tmp_path, synthetic_cache):
    from dist_export.calibration.data import random_token_samples
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic(model)
    got = calibrate(src, _recipe(tmp_path), str(tmp_path / "calib.safetensors"), random_tokens=True, num_samples=3, seq_len=24, seed=5)
    vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
    ref = _reference_kv_amax(src, random_token_samples(vocab, 3, 24, 5).samples)
    assert sorted(got) == sorted(ref) and len(ref) == 4, (sorted(got), sorted(ref))
    for name, value in ref.items():
        assert float(got[name]) == value, (name, float(got[name]), value)


@pytest.fixture(scope="module")
def kv_exports(tmp_path_factory, synthetic_cache):
    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("kv")
    src = ensure_synthetic("synthetic:llama-tiny")
    recipe = _recipe(root)
    calib = str(root / "calib.safetensors")
    amax = calibrate(src, recipe, calib, random_tokens=True, num_samples=3, seq_len=24)
    outs = {}
    for fmt in ("compressed-tensors", "modelopt", "vllm-fq"):
        outs[fmt] = str(root / fmt)
        export(src, outs[fmt], recipe=recipe, format=fmt, calib=calib)
    return src, amax, outs


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                found.update({k: h.get_tensor(k) for k in h.keys()})
    return found


LAYERS = ("model.layers.0.self_attn", "model.layers.1.self_attn")


@pytest.mark.parametrize("fmt,name,shape", [("compressed-tensors", "{a}.{r}_scale", (1,)),
                                            ("modelopt", "{a}.{r}_proj.{r}_scale", ())])
def test_real_quant_formats_write_kv_scales(kv_exports, fmt, name, shape):
    from dist_export.verify import verify_export

    src, amax, outs = kv_exports
    tensors = _tensors(outs[fmt])
    scales = {k: v for k, v in tensors.items() if k.endswith(("k_scale", "v_scale"))}
    want = {name.format(a=a, r=r): amax[f"{a}.{r}_bmm_quantizer"] for a in LAYERS for r in "kv"}
    assert sorted(scales) == sorted(want), sorted(scales)
    for key, a in want.items():
        t = scales[key]
        assert t.dtype == torch.float32 and tuple(t.shape) == shape, (key, t.dtype, t.shape)
        assert torch.equal(t.reshape(()), (a.float() / FP8_MAX).reshape(())), (key, t, a)
    qc = json.load(open(os.path.join(outs[fmt], "config.json")))["quantization_config"]
    if fmt == "compressed-tensors":
        assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                         "strategy": "tensor", "dynamic": False, "observer": "minmax"}
    else:
        assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
        hf = json.load(open(os.path.join(outs[fmt], "hf_quant_config.json")))
        assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"
    report = verify_export(outs[fmt], src)
    assert report["ok"], report["defects"]


def test_vllm_fq_state_carries_kv_quantizers(kv_exports):
    _, amax, outs = kv_exports
    state = torch.load(os.path.join(outs["vllm-fq"], "vllm_fq_modelopt_state.pth"), weights_only=True)
    qstate = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    weights = state["modelopt_state_weights"]
    for a in LAYERS:
        for r in "kv":
            q = f"{a}.{r}_bmm_quantizer"
            assert qstate[q]["_disabled"] is False and qstate[q]["_num_bits"] == (4, 3), qstate[q]
            assert qstate[q]["_dynamic"] is False and qstate[q]["_axis"] is None
            assert torch.equal(weights[q]["_amax"], amax[q].to(torch.bfloat16).reshape(())), (q, weights[q])
    entry = state["modelopt_state_dict"][0][1]["config"]["quant_cfg"][-1]
    assert entry["quantizer_name"] == "*[kv]_bmm_quantizer" and entry["enable"] is True
    assert entry["cfg"]["num_bits"] == (4, 3) and entry["cfg"]["axis"] is None
    assert not [k for k in _tensors(outs["vllm-fq"]) if "scale" in k]


def test_kv_cache_refusals(tmp_path, synthetic_cache):
    from dist_export.api import export
    from dist_export.recipe import load_recipe, recipe_from_dict
    from dist_export.sources.synthetic import ensure_synthetic

    with pytest.raises(ValueError, match=r"kv_cache 'int8' is not supported; valid: \['fp8'\]"):
        recipe_from_dict({"rules": [{"weight": {"format": "fp8"}}], "kv_cache": "int8"})
    assert "kv_cache" not in load_recipe("fp8").to_dict()  # packaged recipes keep their fingerprints
    src = ensure_synthetic("synthetic:llama-tiny")
    with pytest.raises(ValueError, match="--format fp8-block cannot carry the recipe's kv_cache"):
        export(src, str(tmp_path / "a"), recipe=_recipe(tmp_path), format="fp8-block")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.v_proj is not quantized"):
        export(src, str(tmp_path / "b"), recipe=_recipe(tmp_path, "ex", ["*.v_proj"]), format="modelopt")
    with pytest.raises(ValueError, match="calibrate first"):
        export(src, str(tmp_path / "c"), recipe=_recipe(tmp_path), format="modelopt")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_modelopt_restores_kv_quantizers(kv_exports):
    """ModelOpt's convert + restore (the worker's sequence, on the HF model) of the vllm-fq state: the attention's
    k/v_bmm_quantizers come up enabled, static FP8, with our amax, and quantize keys as formats.md's FP8 formula."""
    pytest.importorskip("modelopt")
    import warnings

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import LlamaForCausalLM

    from test_state_file import _fp8_reference, _restore_as_vllm_worker_does

    _, amax, outs = kv_exports
    out = outs["vllm-fq"]
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True, map_location="cpu")
    file_weights = state.pop("modelopt_state_weights")
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _restore_as_vllm_worker_does(model, state)
        mtq.utils.set_quantizer_state_dict(model, file_weights)
    for a in LAYERS:
        for r in "kv":
            q = model.get_submodule(f"{a}.{r}_bmm_quantizer")
            assert isinstance(q, TensorQuantizer) and q.is_enabled and not q._dynamic, (a, r, q)
            assert q.num_bits == (4, 3)
            assert torch.equal(q.amax, file_weights[f"{a}.{r}_bmm_quantizer"]["_amax"]), (a, r, q.amax)
    q = model.model.layers[0].self_attn.k_bmm_quantizer
    x = (torch.randn(1, 1, 8, 16) * 0.8).to(torch.bfloat16)
    with torch.no_grad():
        got = q(x).float()
    want = _fp8_reference(x, q.amax.float()).to(torch.bfloat16).float()
    assert torch.equal(got, want), (got - want).abs().max()
