"""The presets issue 18 names (plain W8A8 INT8, MXFP4 / MXFP8 weights, and with MX activations): exported end to
end (CLI, vllm-fq), every quantized weight equal to an independent reference (INT8 per channel from formats.md
section 5; MX from the OCP MX v1.0 scalar reference of test_mx.py), the W8A8 input quantizers dynamic INT8 per
token and the MX ones in ModelOpt's MX settings in the state file; llm-compressor's W8A8 resolves to int8-w8a8,
and the MX names of ModelOpt and llm-compressor (other block-scale rules) are refused naming ours."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from helpers import model_dir, run_cli
from numerics_reference import ref_compute_amax, ref_fake_quant
from test_mx import _ref as mx_reference

MODEL = "synthetic:qwen3-tiny"


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _reference(w: torch.Tensor, recipe: str) -> torch.Tensor:
    if recipe == "int8-w8a8":
        return ref_fake_quant(w, "int8", "channel", None, ref_compute_amax(w, "int8", "channel"))
    return mx_reference(w.float(), recipe.split("-")[0]).to(w.dtype)


MX_INPUT_BITS = {"mxfp8-w8a8": (4, 3), "mxfp4-w4a4": (2, 1)}  # ModelOpt's num_bits: E4M3, E2M1


@pytest.mark.parametrize("recipe", ["int8-w8a8", "mxfp4-w4a16", "mxfp8-w8a16", "mxfp8-w8a8", "mxfp4-w4a4"])
def test_preset_exports_match_the_reference(tmp_path, recipe):
    src = model_dir(MODEL)
    out = str(tmp_path / "out")
    run_cli("export", "--model", src, "--recipe", recipe, "--out", out)
    source, exported = _tensors(src), _tensors(out)
    quantized = [k for k, v in source.items() if k.endswith("_proj.weight") and v.dim() == 2]
    assert len(quantized) == 14
    for name, w in source.items():
        want = _reference(w, recipe) if name in quantized else w
        assert torch.equal(exported[name], want), name
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)
    qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    inputs = {k: v for k, v in qs.items() if k.endswith(".input_quantizer") and not v["_disabled"]}
    if recipe == "int8-w8a8":
        assert len(inputs) == 14 and all(v["_num_bits"] == 8 and v["_dynamic"] and v["_block_sizes"] == {-1: None}
                                         for v in inputs.values()), list(inputs.values())[:1]
    elif recipe in MX_INPUT_BITS:  # ModelOpt's own MX input settings (its MX*_DEFAULT_CFG): no amax, no calibration
        want = {"_num_bits": MX_INPUT_BITS[recipe], "_dynamic": False,
                "_block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
        assert len(inputs) == 14 and all({k: v[k] for k in want} == want for v in inputs.values()), \
            list(inputs.values())[:1]
        assert not [k for k, v in inputs.items() if v["_pytorch_state_metadata"]["buffers"]]
        assert not [k for k in state["modelopt_state_weights"] if "_amax" in state["modelopt_state_weights"][k]]
    else:
        assert inputs == {}  # weight-only
    record = json.load(open(os.path.join(out, "dist_export.json")))
    assert record["recipe"]["name"] == recipe


@pytest.mark.parametrize("alias, ours", [("W8A8", "int8-w8a8"), ("w8a8", "int8-w8a8")])
def test_other_tools_names_resolve(alias, ours):
    from dist_export.recipe import load_recipe

    assert load_recipe(alias).name == ours


@pytest.mark.parametrize("name, ours", [("MXFP8_DEFAULT_CFG", "mxfp8-w8a8"), ("mxfp8", "mxfp8-w8a8"),
                                        ("MXFP4", "mxfp4-w4a4"), ("MXFP4A16", "mxfp4-w4a16"),
                                        ("INT8_SMOOTHQUANT_CFG", "int8-w8a8")])
def test_different_semantics_are_refused_naming_ours(name, ours):
    from dist_export.recipe import load_recipe

    with pytest.raises(ValueError, match=f"--recipe {ours}"):
        load_recipe(name)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_real_quant_formats_refuse_mx_activations(tmp_path, fmt):
    """No real-quant layout here stores MX input quantizers: one line, nothing written."""
    proc = run_cli("export", "--model", model_dir(MODEL), "--recipe", "mxfp4-w4a4", "--format", fmt,
                   "--out", str(tmp_path / "o"), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(lines) == 1 and "mxfp4" in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
