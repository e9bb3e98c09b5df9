"""Single-process exports end to end: every recipe on a dense and a MoE model, loaded back by transformers,
compared with the independent reference fold, and checked by `verify`."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import model_dir
from expected import expected_folds, read_all

RECIPES = ["fp8", "fp8-pc-pt", "fp8-block", "nvfp4", "nvfp4-w4a16", "int4-w4a16", "int8-w8a16",
           "mixed-fp8block-nvfp4"]
STATIC = {"fp8", "nvfp4"}
MODELS = ["synthetic:llama-tiny", "synthetic:qwen3-moe-tiny"]


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory):
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    out = {}
    root = tmp_path_factory.mktemp("calib")
    for model in MODELS:
        for recipe in sorted(STATIC):
            path = str(root / f"{model.split(':')[1]}-{recipe}.safetensors")
            calibrate(model_dir(model), load_recipe(recipe), path, random_tokens=True, num_samples=2, seq_len=16)
            out[(model, recipe)] = path
    return out


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_matches_reference_and_loads(model, recipe, tmp_path, calib_files):
    from transformers import AutoModelForCausalLM

    from dist_export.api import export
    from dist_export.verify import verify_export

    src = model_dir(model)
    out = str(tmp_path / "out")
    export(src, out, recipe=recipe, format="vllm-fq", calib=calib_files.get((model, recipe)))

    # the source key set with quantized weights folded, everything else byte-identical
    source = read_all(src)
    got = read_all(out)
    assert sorted(got) == sorted(source)
    want, quantized = expected_folds(source, recipe)
    assert quantized, "the recipe quantized nothing"
    for name in source:
        assert got[name].dtype == source[name].dtype and got[name].shape == source[name].shape, name
        assert torch.equal(got[name].view(torch.uint8) if got[name].dtype != torch.bool else got[name],
                           want[name].view(torch.uint8) if want[name].dtype != torch.bool else want[name]), name
        if name not in quantized:
            assert torch.equal(got[name], source[name])

    # files: safetensors metadata, mode 0644, config without quantization_config
    for f in os.listdir(out):
        assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o644, f
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))

    # transformers loads it with nothing missing, unexpected or mismatched
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    # state file: input quantizers only, amax for static recipes
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)
    qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    assert not any("weight_quantizer" in k for k in qs)
    amax_keys = [k for k, v in state["modelopt_state_weights"].items() if "_amax" in v]
    assert bool(amax_keys) == (recipe in STATIC)

    report = verify_export(out, source_dir=src)
    assert report["ok"], report["defects"]
    assert report["recomputed"] == len(source)


def test_fused_experts_quantized_even_if_never_routed(tmp_path, calib_files):
    """Weight amax comes from every expert's own weights, whatever the calibration routed."""
    from dist_export.api import export

    src = model_dir("synthetic:qwen3-moe-tiny")
    out = str(tmp_path / "out")
    export(src, out, recipe="int4-w4a16")
    source, got = read_all(src), read_all(out)
    want, quantized = expected_folds(source, "int4-w4a16")
    experts = [n for n in quantized if ".experts." in n]
    assert len(experts) == 2 * 8 * 3
    for n in experts:
        assert torch.equal(got[n], want[n]) and not torch.equal(got[n], source[n]), n


def test_default_command_runs(tmp_path):
    """The README's first command: the built-in default model and recipe, nothing downloaded; the demo model is
    announced once (issue 18: forgetting --model used to export a random model without a word)."""
    from helpers import run_cli

    proc = run_cli("export", "--out", str(tmp_path / "out"))
    demo = [line for line in proc.stderr.splitlines() if "no --model given" in line]
    assert len(demo) == 1 and "DEMO model synthetic:llama-tiny" in demo[0], proc.stderr[-2000:]
    assert "verify: " in proc.stderr and "no defects" in proc.stderr
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_static_recipe_that_quantizes_lm_head(tmp_path):
    """A static FP8 recipe that includes lm_head (a top-level module, no prefix): its weight is the reference fold
    and the state file carries the calibrated lm_head input amax (formerly `stack expects a non-empty TensorList`)."""
    from safetensors import safe_open

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import recipe_from_dict
    from numerics_reference import ref_compute_amax, ref_fake_quant

    recipe = recipe_from_dict({"name": "fp8-lm-head", "default_exclude": False, "exclude": ["*embed_tokens", "*norm"],
                               "rules": [{"match": ["*"], "weight": {"format": "fp8"},
                                          "input": {"format": "fp8", "dynamic": False}}]})
    src = model_dir("synthetic:qwen3-tiny")  # untied: lm_head is a tensor of its own
    calib = str(tmp_path / "calib.safetensors")
    calibrate(src, recipe, calib, random_tokens=True, num_samples=2, seq_len=16)
    with safe_open(calib, "pt") as f:
        lm_amax = f.get_tensor("lm_head.input_quantizer")
    out = str(tmp_path / "out")
    export(src, out, recipe=recipe, calib=calib, device="cpu")
    w = read_all(src)["lm_head.weight"]
    want = ref_fake_quant(w, "fp8", "tensor", None, ref_compute_amax(w, "fp8", "tensor"))
    assert torch.equal(read_all(out)["lm_head.weight"], want) and not torch.equal(want, w)
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)
    assert torch.equal(state["modelopt_state_weights"]["lm_head.input_quantizer"]["_amax"],
                       lm_amax.to(torch.bfloat16).reshape(()))
