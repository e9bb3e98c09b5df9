"""Real-quant formats: what serving engines load, dequantized independently here, must equal the fake-quant
fold of the same recipe bit for bit (at world sizes 1 and 2)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import model_dir
from expected import read_all
from multirank import run_ranks
from numerics_reference import e2m1_code_values, unpack_e2m1_codes

MODELS = ["synthetic:llama-tiny", "synthetic:qwen3-moe-tiny"]
# (recipe, real format)
CASES = [("fp8-block", "fp8-block"), ("fp8", "modelopt"), ("nvfp4", "modelopt"), ("mixed-fp8-nvfp4", "modelopt"),
         ("fp8-pc-pt", "modelopt"), ("nvfp4-w4a16", "modelopt")]


MODELOPT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "mixed-fp8-nvfp4": "MIXED_PRECISION",
                 "fp8-pc-pt": "FP8_PER_CHANNEL_PER_TOKEN", "nvfp4-w4a16": "W4A16_NVFP4"}


def _expand(scale: torch.Tensor, rows: int, cols: int, shape) -> torch.Tensor:
    return scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: shape[0], : shape[1]]


def dequantize_independently(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """formats.md sections 3 and 4, read literally: {module.weight: float32 values}."""
    out = {}
    for name, w in tensors.items():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if f"{module}.weight_scale_inv" in tensors:  # native block FP8
            b0, b1 = config["quantization_config"]["weight_block_size"]
            inv = tensors[f"{module}.weight_scale_inv"]
            out[name] = w.float() * _expand(inv, b0, b1, w.shape)
        elif w.dtype == torch.float8_e4m3fn:  # ModelOpt FP8: per tensor [] or per output channel [N]
            scale = tensors[f"{module}.weight_scale"]
            out[name] = w.float() * (scale.reshape(-1, 1) if scale.dim() == 1 else scale)
        elif w.dtype == torch.uint8:  # ModelOpt NVFP4: low nibble = even column
            values = e2m1_code_values(unpack_e2m1_codes(w))
            scale = tensors[f"{module}.weight_scale"].float() * tensors[f"{module}.weight_scale_2"]
            out[name] = values * _expand(scale, 1, 16, values.shape)
    return out


def _calib(model, recipe, tmp_path):
    if recipe not in ("fp8", "nvfp4", "mixed-fp8-nvfp4"):
        return None
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    path = str(tmp_path / "calib.safetensors")
    calibrate(model_dir(model), load_recipe(recipe), path, random_tokens=True, num_samples=2, seq_len=16)
    return path


def _export_ranks(ctx, src, out, recipe, fmt, calib):
    from dist_export.api import export

    export(src, out, recipe=recipe, format=fmt, calib=calib, max_shard_size="40KB", ctx=ctx)
    return True


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("recipe,fmt", CASES)
def test_real_quant_dequantizes_to_fake_quant(model, recipe, fmt, tmp_path):
    from dist_export.api import export

    src = model_dir(model)
    calib = _calib(model, recipe, tmp_path)
    fake = str(tmp_path / "fake")
    export(src, fake, recipe=recipe, format="vllm-fq", calib=calib)
    folded = read_all(fake)
    for ws in (1, 2):
        real = str(tmp_path / f"real{ws}")
        if ws == 1:
            export(src, real, recipe=recipe, format=fmt, calib=calib)
        else:
            res = run_ranks(2, _export_ranks, src, real, recipe, fmt, calib, tmp_path=tmp_path)
            assert all(s == "ok" for s, _ in res), res
        with open(os.path.join(real, "config.json")) as f:
            config = json.load(f)
        tensors = read_all(real)
        deq = dequantize_independently(tensors, config)
        assert len(deq) >= 7 * (1 if "llama" in model else 3), sorted(deq)[:5]
        for name, values in deq.items():
            want = folded[name]
            got = values.to(want.dtype)
            diff = (got != want).sum().item()
            assert diff == 0, f"{fmt} {name}: {diff} elements differ from the fake-quant fold"
        # unquantized tensors identical; no scale for modules the engine keeps unquantized
        for name, t in folded.items():
            if name not in deq:
                assert torch.equal(tensors[name], t), name
        qc = config["quantization_config"]
        assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in tensors)
        if fmt == "fp8-block":
            assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic"
            assert qc["weight_block_size"] == [128, 128] and qc["fmt"] == "e4m3"
            assert "lm_head" in qc["ignored_layers"] and qc["ignored_layers"] == qc["modules_to_not_convert"]
        else:
            # config.json as current vLLM reads it (`ignore`, config_groups); hf_quant_config.json ModelOpt's record
            assert qc["quant_method"] == "modelopt" and "lm_head" in qc["ignore"] and "exclude_modules" not in qc
            assert qc["config_groups"] and all(g["targets"] for g in qc["config_groups"].values())
            with open(os.path.join(real, "hf_quant_config.json")) as f:
                hf = json.load(f)
            assert hf["quantization"]["quant_algo"] == qc["quant_algo"] == MODELOPT_ALGO[recipe]
            assert hf["quantization"]["exclude_modules"] == qc["ignore"]
            if recipe == "mixed-fp8-nvfp4":
                layers = qc["quantized_layers"]
                assert layers["model.layers.0.self_attn.q_proj"]["quant_algo"] == "FP8"
                mlp = [k for k in layers if ".mlp." in k]
                assert mlp and all(layers[k]["quant_algo"] == "NVFP4" for k in mlp)
            # fused groups agree: input scales of q/k/v and gate/up, NVFP4 weight_scale_2
            for layer in ("model.layers.0", "model.layers.1"):
                has_input = MODELOPT_ALGO[recipe] in ("FP8", "NVFP4", "MIXED_PRECISION")
                assert (f"{layer}.self_attn.q_proj.input_scale" in tensors) == has_input
                if has_input:
                    qkv = [tensors[f"{layer}.self_attn.{p}.input_scale"] for p in ("q_proj", "k_proj", "v_proj")]
                    assert all(torch.equal(qkv[0], t) for t in qkv)
                if f"{layer}.self_attn.q_proj.weight_scale_2" in tensors:
                    ws2 = [tensors[f"{layer}.self_attn.{p}.weight_scale_2"] for p in ("q_proj", "k_proj", "v_proj")]
                    assert all(torch.equal(ws2[0], t) for t in ws2)
        from dist_export.verify import verify_export

        report = verify_export(real, source_dir=src)
        assert report["ok"], report["defects"]


def test_fp8_block_loads_in_transformers_like_fake_quant(tmp_path):
    """transformers dequantizes a native FP8 checkpoint on CPU: weights and logits equal the fake-quant export."""
    from transformers import AutoModelForCausalLM

    from dist_export.api import export

    src = model_dir("synthetic:llama-small")
    export(src, str(tmp_path / "real"), recipe="fp8-block", format="fp8-block")
    export(src, str(tmp_path / "fake"), recipe="fp8-block", format="vllm-fq")
    real, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "real"), output_loading_info=True,
                                                      dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    fake = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fake"), dtype=torch.bfloat16)
    real_sd, fake_sd = real.state_dict(), fake.state_dict()
    for name, t in fake_sd.items():
        r = real_sd[name]
        if r.dtype == torch.float8_e4m3fn:  # kept in FP8 with scales: dequantize the module's weight
            continue
        assert torch.equal(r, t), name
    ids = torch.randint(0, real.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(real(ids).logits, fake(ids).logits)


def test_real_formats_refuse_what_they_cannot_describe(tmp_path):
    from dist_export.api import export

    src = model_dir("synthetic:llama-tiny")
    with pytest.raises(ValueError, match="fp8-block stores only FP8 128x128"):
        export(src, str(tmp_path / "a"), recipe="mixed-fp8block-nvfp4", format="fp8-block")
    with pytest.raises(ValueError, match="modelopt stores FP8 per tensor with static FP8 inputs"):
        export(src, str(tmp_path / "b"), recipe="int4-w4a16", format="modelopt")
    with pytest.raises(ValueError, match="fp8-pc-pt, nvfp4 or nvfp4-w4a16"):
        export(src, str(tmp_path / "c"), recipe="fp8-block", format="modelopt")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_fp8_block_tp_report_and_ragged_warning(tmp_path, caplog):
    from dist_export.api import export
    from dist_export.verify import verify_export

    export(model_dir("synthetic:llama-small"), str(tmp_path / "s"), recipe="fp8-block", format="fp8-block")
    report = verify_export(str(tmp_path / "s"))
    # small: hidden 512, kv 256, intermediate 1536: every partition a multiple of 128 up to TP 2
    assert report["vllm_tp_sizes"] == [1, 2], report
    assert not report["warnings"]
    export(model_dir("synthetic:llama-tiny"), str(tmp_path / "t"), recipe="fp8-block", format="fp8-block")
    assert any("not a multiple of 128" in r.message for r in caplog.records)
    report = verify_export(str(tmp_path / "t"))
    assert report["ok"] and report["warnings"] and report["vllm_tp_sizes"] == []
