"""The presets issue 18 names (plain W8A8 INT8, MXFP4 / MXFP8 weights): exported end to end (CLI, vllm-fq), every
quantized weight equal to an independent reference (INT8 per channel from formats.md section 5; MX from the OCP
MX v1.0 scalar reference of test_mx.py), the W8A8 input quantizers dynamic INT8 per token in the state file; the
ModelOpt and llm-compressor names resolve to them, and the MX names whose activations we do not quantize are
refused naming ours."""
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


@pytest.mark.parametrize("recipe", ["int8-w8a8", "mxfp4-w4a16", "mxfp8-w8a16"])
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
    else:
        assert inputs == {}  # weight-only
    record = json.load(open(os.path.join(out, "dist_export.json")))
    assert record["recipe"]["name"] == recipe


@pytest.mark.parametrize("alias, ours", [("W8A8", "int8-w8a8"), ("MXFP4A16", "mxfp4-w4a16"),
                                         ("mxfp8a16", "mxfp8-w8a16")])
def test_other_tools_names_resolve(alias, ours):
    from dist_export.recipe import load_recipe

    assert load_recipe(alias).name == ours


@pytest.mark.parametrize("name, ours", [("MXFP8_DEFAULT_CFG", "mxfp8-w8a16"), ("mxfp8", "mxfp8-w8a16"),
                                        ("MXFP4", "mxfp4-w4a16"), ("INT8_SMOOTHQUANT_CFG", "int8-w8a8")])
def test_different_semantics_are_refused_naming_ours(name, ours):
    from dist_export.recipe import load_recipe

    with pytest.raises(ValueError, match=f"--recipe {ours}"):
        load_recipe(name)


def test_real_quant_formats_refuse_mx(tmp_path):
    proc = run_cli("export", "--model", model_dir(MODEL), "--recipe", "mxfp4-w4a16", "--format", "compressed-tensors",
                   "--out", str(tmp_path / "o"), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(lines) == 1 and "mxfp4" in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
