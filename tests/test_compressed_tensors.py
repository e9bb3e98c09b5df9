"""`--format compressed-tensors`: the compressed-tensors package's own decompression of every quantized module,
and transformers' `dequantize=True` load of the whole folder, give exactly the `vllm-fq` fold of the same recipe.

The oracle is compressed-tensors itself (its config parser and its compressors), never our own code. It runs in
a consumer venv (tests/ct_tool.py); the tests skip where none exists.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from safetensors.torch import load_file

from helpers import model_dir
from ct_tool import run_ct
from expected import read_all

CALIBRATED = ("fp8", "nvfp4", "mixed-fp8-nvfp4")
# recipe -> (compressed-tensors format, llm-compressor preset it corresponds to)
RECIPES = {
    "int4-w4a16": "pack-quantized",
    "int4-w4a16-mse": "pack-quantized",
    "int8-w8a16": "pack-quantized",
    "fp8-pc-pt": "float-quantized",
    "fp8": "float-quantized",
    "fp8-block": "float-quantized",
    "nvfp4": "nvfp4-pack-quantized",
    "nvfp4-w4a16": "nvfp4-pack-quantized",
    "nvfp4-mse": "nvfp4-pack-quantized",
    "nvfp4-mse-wide": "nvfp4-pack-quantized",
    "int8-w8a8": "int-quantized",
    "mxfp8-w8a16": "mxfp8-quantized",
    "mxfp4-w4a16": "mxfp4-pack-quantized",
    "mixed-fp8block-nvfp4": "mixed-precision",
    "mixed-fp8-nvfp4": "mixed-precision",
}


# INT groups of 128 need input sizes that are multiples of 128 (llama-small); MoE experts per expert (qwen3-moe)
MODELS = {"int4-w4a16": "synthetic:llama-small", "int4-w4a16-mse": "synthetic:llama-small",
          "int8-w8a16": "synthetic:qwen3-moe-tiny", "fp8-pc-pt": "synthetic:qwen3-moe-tiny",
          "nvfp4-w4a16": "synthetic:qwen3-moe-tiny", "int8-w8a8": "synthetic:qwen3-moe-tiny",
          "mxfp4-w4a16": "synthetic:qwen3-moe-tiny"}


def _calib(model, recipe, tmp_path, kv_cache=None):
    if recipe not in CALIBRATED and kv_cache is None:
        return None
    from dist_export.api import export_recipe
    from dist_export.calibration.run import calibrate

    path = str(tmp_path / "calib.safetensors")
    calibrate(model_dir(model), export_recipe(recipe, kv_cache), path, random_tokens=True, num_samples=2,
              seq_len=16)
    return path


def _exports(model, recipe, tmp_path, kv_cache=None):
    from dist_export.api import export

    src = model_dir(model)
    calib = _calib(model, recipe, tmp_path, kv_cache)
    export(src, str(tmp_path / "fake"), recipe=recipe, format="vllm-fq", calib=calib, kv_cache=kv_cache)
    export(src, str(tmp_path / "ct"), recipe=recipe, format="compressed-tensors", calib=calib, max_shard_size="40KB",
           kv_cache=kv_cache)
    with open(tmp_path / "ct" / "config.json") as f:
        config = json.load(f)
    return read_all(str(tmp_path / "fake")), read_all(str(tmp_path / "ct")), config


_DECOMPRESS = r"""
import glob, json, sys
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig

folder, out_path = sys.argv[1:3]
config = json.load(open(folder + "/config.json"))
tensors = {}
for f in sorted(glob.glob(folder + "/*.safetensors")):
    tensors.update(load_file(f))
qc = QuantizationConfig.model_validate(config["quantization_config"])
modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith((".weight_scale", ".weight_packed"))})
out = {}
for m in modules:
    groups = [g for g in qc.config_groups.values() if "Linear" in g.targets or m in g.targets]
    assert len(groups) == 1, (m, groups)
    scheme = groups[0]
    sd = {k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".") and "." not in k[len(m) + 1:]}
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
    out[m + ".weight"] = compressor.decompress(sd, scheme)["weight"].contiguous()
save_file(out, out_path)
"""


def _ct_decompress(folder, tmp_path) -> dict[str, torch.Tensor]:
    """{module.weight: dequantized values} by compressed-tensors' own compressors, per config group."""
    out = str(tmp_path / "ct_decompressed.safetensors")
    run_ct(_DECOMPRESS, str(folder), out)
    return load_file(out)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compressed_tensors_decompresses_to_the_fold(recipe, tmp_path):
    model = MODELS.get(recipe, "synthetic:llama-tiny")
    folded, tensors, config = _exports(model, recipe, tmp_path)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == RECIPES[recipe]
    assert qc["quantization_status"] == "compressed" and "kv_cache_scheme" in qc
    assert "lm_head" in qc["ignore"]
    groups = qc["config_groups"]
    if recipe.startswith("mixed"):  # one group per scheme, modules named exactly
        assert sorted(g["format"] for g in groups.values()) == ["float-quantized", "nvfp4-pack-quantized"]
        assert all("Linear" not in g["targets"] for g in groups.values())
    else:
        assert len(groups) == 1 and groups["group_0"]["targets"] == ["Linear"]
    deq = _ct_decompress(tmp_path / "ct", tmp_path)
    assert len(deq) >= 7, sorted(deq)
    for name, values in deq.items():
        want = folded[name]
        got = values.to(want.dtype)
        diff = (got != want).sum().item()
        assert diff == 0, f"{recipe} {name}: {diff} of {want.numel()} elements differ from the fold"
        # FP8, NVFP4 and MX keep the sign of zero too (INT codes have no -0)
        if RECIPES[recipe] not in ("pack-quantized", "int-quantized"):
            assert torch.equal(_bytes(got), _bytes(want)), name
    for name, t in folded.items():  # everything else byte-identical, nothing extra
        if name not in deq:
            assert torch.equal(tensors[name], t), name
    assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in tensors)


_LOAD = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

folder, out_path, info_path = sys.argv[1:4]
model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.bfloat16,
                                                   quantization_config=CompressedTensorsConfig(dequantize=True))
save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out_path)
json.dump({k: sorted(map(str, v)) for k, v in info.items()}, open(info_path, "w"))
"""


def test_transformers_dequantize_load_equals_fake_quant(tmp_path):
    """transformers + compressed-tensors load the folder (no missing/unexpected keys) with the fold's weights."""
    # (NVFP4 MoE experts are left out: transformers 5.24 dequantizes them without weight_global_scale, for
    # llm-compressor's files alike; compressed-tensors' own decompression of them is tested above.)
    for model, recipe in (("synthetic:llama-tiny", "nvfp4"), ("synthetic:llama-tiny", "fp8-block"),
                          ("synthetic:qwen3-moe-tiny", "int8-w8a16"), ("synthetic:qwen3-moe-tiny", "fp8-pc-pt"),
                          ("synthetic:llama-tiny", "int8-w8a8"), ("synthetic:llama-tiny", "mxfp8-w8a16"),
                          ("synthetic:llama-tiny", "mxfp4-w4a16")):
        _check_dequantize_load(model, recipe, tmp_path)


@pytest.mark.parametrize("model,recipe", [("synthetic:llama-tiny", "fp8"), ("synthetic:llama-tiny", "nvfp4-w4a16"),
                                          ("synthetic:llama-tiny", "nvfp4-mse"),
                                          ("synthetic:llama-small", "int4-w4a16"),
                                          ("synthetic:llama-small", "int4-w4a16-mse")])
def test_transformers_dequantize_load_the_other_schemes(model, recipe, tmp_path):
    """README's remaining compressed-tensors x transformers cells: the same load, one scheme each."""
    _check_dequantize_load(model, recipe, tmp_path)


def test_transformers_loads_fp8_kv_cache_export_without_its_kv_scales(tmp_path):
    """fp8-pc-pt + --kv-cache fp8: transformers loads the weights (equal to the fold); it has no FP8 KV cache,
    so the attention modules' k_scale / v_scale are its only unexpected keys (4: 2 layers x k, v)."""
    assert _check_dequantize_load("synthetic:llama-tiny", "fp8-pc-pt", tmp_path, kv_cache="fp8") == [
        f"model.layers.{i}.self_attn.{r}_scale" for i in range(2) for r in "kv"]


def _check_dequantize_load(model, recipe, tmp_path, kv_cache=None) -> list[str]:
    """transformers' dequantize=True load of the compressed-tensors export: every tensor finds its parameter and
    equals the vllm-fq fold."""
    from transformers import AutoModelForCausalLM

    (tmp_path / recipe).mkdir()
    _exports(model, recipe, tmp_path / recipe, kv_cache)
    out, info_path = tmp_path / recipe / "loaded.safetensors", tmp_path / recipe / "info.json"
    run_ct(_LOAD, str(tmp_path / recipe / "ct"), str(out), str(info_path))
    with open(info_path) as f:
        info = json.load(f)
    # a dequantized (dense) model has no parameter for activation scales, so transformers reports them
    # as unexpected (llm-compressor's own files alike); every other tensor must find its parameter
    unexpected = {k for k in info["unexpected_keys"] if not k.endswith((".input_global_scale", ".input_scale"))}
    kv_scales = sorted(k for k in unexpected if k.endswith(("self_attn.k_scale", "self_attn.v_scale")))
    if kv_cache is not None:  # transformers has no FP8 KV cache: the scales find no parameter
        unexpected -= set(kv_scales)
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"], info
    fake = AutoModelForCausalLM.from_pretrained(str(tmp_path / recipe / "fake"), dtype=torch.bfloat16)
    real_sd = load_file(str(out))
    for name, t in fake.state_dict().items():
        # (transformers keeps dequantized INT/FP8 MoE experts in the scale dtype, float32)
        assert torch.equal(real_sd[name].to(t.dtype), t), (recipe, name)
    return kv_scales


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _export_ranks(ctx, src, out, recipe, calib):
    from dist_export.api import export

    export(src, out, recipe=recipe, format="compressed-tensors", calib=calib, max_shard_size="40KB", ctx=ctx)
    return True


def test_two_ranks_write_the_same_export_and_verify_recomputes_it(tmp_path):
    """World size 2 gives the same tensors as world size 1; fused q/k/v and gate/up share one NVFP4 global
    scale and one input scale; `verify --source` recomputes every tensor bit for bit."""
    from multirank import run_ranks

    from dist_export.verify import verify_export

    model, recipe = "synthetic:qwen3-moe-tiny", "nvfp4"
    _, one, config = _exports(model, recipe, tmp_path)
    calib = str(tmp_path / "calib.safetensors")
    res = run_ranks(2, _export_ranks, model_dir(model), str(tmp_path / "two"), recipe, calib, tmp_path=tmp_path)
    assert all(s == "ok" for s, _ in res), res
    two = read_all(str(tmp_path / "two"))
    assert sorted(one) == sorted(two)
    for name, t in one.items():
        assert torch.equal(_bytes(t), _bytes(two[name])), name
    with open(tmp_path / "two" / "config.json") as f:
        assert json.load(f)["quantization_config"] == config["quantization_config"]
    for layer in ("model.layers.0", "model.layers.1"):
        for suffix in ("weight_global_scale", "input_global_scale"):
            qkv = [one[f"{layer}.self_attn.{p}.{suffix}"] for p in ("q_proj", "k_proj", "v_proj")]
            assert all(torch.equal(qkv[0], t) for t in qkv), (layer, suffix)
    report = verify_export(str(tmp_path / "two"), source_dir=model_dir(model))
    assert report["ok"], report["defects"]


def test_compressed_tensors_refuses_what_it_cannot_store_exactly(tmp_path):
    from dist_export.api import export

    tiny = model_dir("synthetic:llama-tiny")
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        export(tiny, str(tmp_path / "a"), recipe="int4-w4a16", format="compressed-tensors")
    recipe = tmp_path / "w8a8fp8.yaml"  # INT8 weights with FP8 inputs: no compressed-tensors scheme
    recipe.write_text("name: w8a8fp8\nrules:\n  - match: ['*']\n    weight: {format: int8, granularity: channel}\n"
                      "    input: {format: fp8, granularity: token, dynamic: true}\n")
    with pytest.raises(ValueError, match="no scheme for model.layers.0"):
        export(tiny, str(tmp_path / "b"), recipe=str(recipe), format="compressed-tensors")
    from dist_export.sources.synthetic import ensure_synthetic

    with pytest.raises(ValueError, match="decompresses NVFP4 to bfloat16"):
        export(ensure_synthetic("synthetic:llama-tiny", dtype="float16"), str(tmp_path / "c"), recipe="nvfp4-w4a16",
               format="compressed-tensors")
    assert not any(os.path.exists(tmp_path / d) for d in "abc")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_int_scales_are_exact_in_every_model_dtype(dtype, tmp_path):
    """float64 INT scales: compressed-tensors' decompression equals the fold for float16 and float32 models too."""
    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic("synthetic:qwen3-moe-tiny", dtype=dtype)
    export(src, str(tmp_path / "fake"), recipe="int8-w8a16", format="vllm-fq")
    export(src, str(tmp_path / "ct"), recipe="int8-w8a16", format="compressed-tensors")
    folded, tensors = read_all(str(tmp_path / "fake")), read_all(str(tmp_path / "ct"))
    deq = _ct_decompress(tmp_path / "ct", tmp_path)
    assert len(deq) >= 21
    for name, values in deq.items():
        assert tensors[name[: -len("weight")] + "weight_scale"].dtype == torch.float64
        assert torch.equal(values.to(folded[name].dtype), folded[name]), name
