"""`--format modelopt` config: `config.json["quantization_config"]` is what ModelOpt 0.47's own converter
(`modelopt.torch.export.convert_hf_config.convert_hf_quant_config_format`) makes of our `hf_quant_config.json`,
the form current vLLM reads (`ignore`, `config_groups`). The oracle is ModelOpt itself, run in its venv; the test
skips where there is none.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import model_dir

_CANDIDATES = (os.environ.get("DIST_EXPORT_MODELOPT_PYTHON", ""),
               os.path.expanduser("~/.cache/dist_export-ci/venv-modelopt-0.47.0/bin/python"),
               "/work/venvs/modelopt/bin/python")

_CONVERT = r"""
import json, sys
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
print(json.dumps([convert_hf_quant_config_format(json.load(open(p))) for p in sys.argv[1:]]))
"""


def _modelopt_python() -> str:
    for path in _CANDIDATES:
        if path and os.path.exists(path):
            return path
    pytest.skip("ModelOpt is not installed (set DIST_EXPORT_MODELOPT_PYTHON to a Python that has it)")


def test_config_json_is_modelopts_own_conversion_of_hf_quant_config(tmp_path):
    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    src = model_dir("synthetic:llama-tiny")
    calib = str(tmp_path / "calib.safetensors")
    calibrate(src, load_recipe("mixed-fp8-nvfp4"), calib, random_tokens=True, num_samples=1, seq_len=8)
    algos = {"nvfp4-w4a16": "W4A16_NVFP4", "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN",
             "mixed-fp8-nvfp4": "MIXED_PRECISION"}
    for recipe in algos:
        export(src, str(tmp_path / recipe), recipe=recipe, format="modelopt",
               calib=calib if recipe.startswith("mixed") else None)
    paths = [str(tmp_path / r / "hf_quant_config.json") for r in algos]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([_modelopt_python(), "-c", _CONVERT, *paths], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs_all = json.loads(proc.stdout.strip().splitlines()[-1])
    for (recipe, algo), theirs in zip(algos.items(), theirs_all):
        with open(tmp_path / recipe / "config.json") as f:
            ours = json.load(f)["quantization_config"]
        assert ours["quant_algo"] == algo and "lm_head" in ours["ignore"], (recipe, ours)
        # every key ModelOpt writes, with ModelOpt's value (ours may add config_groups where ModelOpt's converter
        # has none for the algo, and vLLM's top-level group_size)
        assert {k: ours.get(k) for k in theirs} == theirs, (recipe, ours, theirs)


def test_transformers_has_no_modelopt_loader(tmp_path):
    """README's `modelopt` x transformers cells, pinned: transformers (5.24 here) has no `modelopt` quantization
    type. It warns and skips the config, so FP8 codes load unscaled with every `weight_scale` unexpected, and
    NVFP4's packed weights do not fit the dense parameters. A transformers that gains a loader fails this test."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from dist_export.api import export

    assert "modelopt" not in AUTO_QUANTIZER_MAPPING
    src = model_dir("synthetic:llama-tiny")
    export(src, str(tmp_path / "fp8"), recipe="fp8-pc-pt", format="modelopt")
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.bfloat16,
                                                       output_loading_info=True)
    assert getattr(model, "hf_quantizer", None) is None
    assert len([k for k in info["unexpected_keys"] if k.endswith(".weight_scale")]) == 14, info["unexpected_keys"]
    export(src, str(tmp_path / "nvfp4"), recipe="nvfp4-w4a16", format="modelopt")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nvfp4"), dtype=torch.bfloat16)
