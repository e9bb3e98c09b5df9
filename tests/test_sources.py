"""Already-quantized sources end to end (docs/sources.md): an FP8-block, MXFP4 or compressed-tensors W8A16 source
exports to the same bytes as its dequantized bf16 copy made by transformers' own dequantization; scales are
consumed; the output config holds only the new quantization; unknown source quantization is refused; FP8-block
re-quantized to fp8-block keeps its codes (the scale difference is measured).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import assert_same_export_of_other_source, run_cli
from ct_tool import run_ct
from dist_export import export
from dist_export.sources.checkpoint import SourceCheckpoint
from dist_export.sources.synthetic import make_model

# Writes the dequantized bf16 copy of a quantized source: transformers loads the source with its own
# dequantization (FP8: FineGrainedFP8Config(dequantize=True); MXFP4: Mxfp4Config(dequantize=True);
# compressed-tensors: CompressedTensorsConfig(run_compressed=False), which calls compressed-tensors'
# decompression), the state dict goes back to checkpoint names with transformers' own reversal, and every
# quantized weight of the source is replaced by transformers' value; every other tensor is copied as stored.
_COPY = r"""
import json, os, shutil, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion
src, dst, kind = sys.argv[1:4]
if kind == "fp8":
    from transformers import FineGrainedFP8Config as C; qc = C(dequantize=True)
    suffix, parts = ".weight_scale_inv", lambda m: [m + ".weight", m + ".weight_scale_inv"]
elif kind == "mxfp4":
    from transformers import Mxfp4Config as C; qc = C(dequantize=True)
    suffix, parts = "_blocks", lambda m: [m + "_blocks", m + "_scales"]
else:
    from transformers import CompressedTensorsConfig as C; qc = C(run_compressed=False)
    suffix, parts = ".weight_packed", lambda m: [m + ".weight_packed", m + ".weight_scale", m + ".weight_shape"]
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
state = revert_weight_conversion(model, model.state_dict())
with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
    stored = {n: f.get_tensor(n) for n in f.keys()}
prefixes = [n[: -len(suffix)] for n in stored if n.endswith(suffix)]
weights = [p if kind == "mxfp4" else p + ".weight" for p in prefixes]
out = {w: state[w].contiguous() for w in weights}
consumed = {n for p in prefixes for n in parts(p)}
out.update({n: t for n, t in stored.items() if n not in consumed})
os.makedirs(dst)
save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(src, "config.json")))
cfg.pop("quantization_config")
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
for name in os.listdir(src):
    if name not in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, name), dst)
print(len(weights))
"""

CASES = [("deepseek-v3", "fp8-block", "fp8"), ("gpt-oss", "mxfp4", "mxfp4"), ("llama", "compressed-tensors", "ct")]


def _copy(src: str, dst: str, kind: str) -> int:
    if kind == "ct":
        return int(run_ct(_COPY, src, dst, kind).split()[-1])
    # the reference copy is made on the CPU: with a GPU visible, transformers 5.17's FP8 loader fails on these
    # checkpoints ("Undefined Operation encountered!", seen on an H200)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", _COPY, src, dst, kind], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("arch,source_format,kind", CASES)
def test_quantized_source_exports_like_its_transformers_dequantized_copy(tmp_path, arch, source_format, kind):
    src = make_model(arch, "tiny", str(tmp_path / "src"), source_format=source_format)
    n = _copy(src, str(tmp_path / "copy"), kind)
    assert n > 0
    export(src, str(tmp_path / "a"), recipe="nvfp4-w4a16")
    export(str(tmp_path / "copy"), str(tmp_path / "b"), recipe="nvfp4-w4a16")
    assert_same_export_of_other_source(tmp_path / "a", tmp_path / "b")
    with open(tmp_path / "a" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if k.endswith(("_scale_inv", "_scale", "_blocks", "_scales", "_packed", "_shape"))]
    assert keys == set(SourceCheckpoint(str(tmp_path / "copy")).tensors)


def test_excluded_quantized_weight_is_written_dequantized(tmp_path):
    """A recipe that leaves an FP8 weight unquantized writes it in the model dtype, never as FP8 bytes."""
    src = make_model("deepseek-v3", "tiny", str(tmp_path / "src"), source_format="fp8-block")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nrules:\n  - match: ['*']\n    weight: {format: int8, granularity: channel}\n"
                      "exclude: ['model.layers.0.*']\n")
    export(src, str(tmp_path / "o"), recipe=str(recipe))
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight")
        assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" not in f.keys()
    source = SourceCheckpoint(src)
    meta = source.tensors["model.layers.0.self_attn.q_a_proj.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, source.read(meta).to("cpu"))


def test_fp8_block_source_to_fp8_block_keeps_codes(tmp_path):
    """Re-quantizing an FP8-block source to fp8-block: identical FP8 codes, scales within 2**-8 (docs/sources.md)."""
    src = make_model("deepseek-v3", "tiny", str(tmp_path / "src"), source_format="fp8-block")
    export(src, str(tmp_path / "o"), recipe="fp8-block", format="fp8-block")
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as b:
        scales = [n for n in a.keys() if n.endswith("weight_scale_inv")]
        assert scales and set(scales) <= set(b.keys())
        for n in scales:
            w = n[: -len("_scale_inv")]
            assert torch.equal(a.get_tensor(w).view(torch.uint8), b.get_tensor(w).view(torch.uint8)), w
            rel = (b.get_tensor(n) / a.get_tensor(n) - 1).abs().max().item()
            assert rel <= 2.0**-8, (n, rel)


def test_unknown_source_quantization_is_refused(tmp_path):
    src = make_model("llama", "tiny", str(tmp_path / "src"), source_format="fp8-block")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="quant_method 'awq'.*supported"):
        SourceCheckpoint(src)
    del cfg["quantization_config"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="holds quantized data but config.json has no quantization_config"):
        SourceCheckpoint(src)


def test_orphan_scale_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_model("llama", "tiny", str(tmp_path / "src"), source_format="fp8-block")
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj.weight.*no .*weight_scale_inv"):
        SourceCheckpoint(src)


def test_make_model_source_format_cli(tmp_path):
    run_cli("make-model", "--arch", "gpt-oss", "--preset", "tiny", "--source-format", "mxfp4",
            "--out", str(tmp_path / "m"))
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "mxfp4"
    proc = run_cli("make-model", "--arch", "llama", "--preset", "tiny", "--source-format", "mxfp4",
                   "--out", str(tmp_path / "n"), check=False)
    assert proc.returncode != 0 and "mxfp4" in proc.stderr
