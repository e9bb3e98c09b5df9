"""Mapping ModelOpt quantizers onto our formats (issue 15, plan stage, user's process): for every enabled weight
quantizer of a tiny ModelOpt-calibrated model, our fold with the mapped QuantSpec and the quantizer's own amax
equals the quantizer applied to the weight by ModelOpt itself, bit for bit. Unexpressible quantizers are refused
by name. Needs nvidia-modelopt (CI: `.ci/modelopt_venv.sh`); skipped where it is absent.

ModelOpt's CPU FP8 path computes `448.0 / amax` (torch: 448 * (1/amax), one rounding more than formats.md's
exact division); for FP8 configs ModelOpt's `fp8_eager` is replaced by the exact division, nothing else.
"""
from __future__ import annotations

import copy

import pytest
import torch

mtq = pytest.importorskip("modelopt.torch.quantization")

from helpers import model_dir  # noqa: E402

from dist_export.numerics import fake_quant  # noqa: E402
from dist_export.sources.quantizer_state import load_state, save_state  # noqa: E402
from dist_export.sources.quantizers import (  # noqa: E402
    amax_in_our_layout, is_modelopt_quantized, quantizer_record, weight_spec)

FP8_MAX = 448.0


def _with(cfg, algorithm=None, weight_cfg=None, extra=()):
    cfg = copy.deepcopy(cfg)
    for e in cfg["quant_cfg"]:
        if weight_cfg and e.get("quantizer_name") == "*weight_quantizer":
            e["cfg"] = {**e["cfg"], **weight_cfg}
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(extra)
    if algorithm is not None:
        cfg["algorithm"] = algorithm
    return cfg


CONFIGS = {
    "fp8": lambda: copy.deepcopy(mtq.FP8_DEFAULT_CFG),
    "fp8-pc-pt": lambda: copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    "int8-wo": lambda: copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG),
    "int4-b128": lambda: copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG),
    "int4-b64": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, weight_cfg={"block_sizes": {-1: 64, "type": "static"}}),
    "int4-b64-mse": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, algorithm="mse",
                                  weight_cfg={"block_sizes": {-1: 64, "type": "static"}}),
    "int4-awq": lambda: _with(mtq.INT4_AWQ_CFG, weight_cfg={"block_sizes": {-1: 32, "type": "static"}}),
    "int8-sq": lambda: copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG),
    "fp8-layer0-off": lambda: _with(mtq.FP8_DEFAULT_CFG, extra=[{"quantizer_name": "*layers.0.*", "enable": False}]),
}
EXPECTED = {"fp8": ("fp8", "tensor", None), "fp8-pc-pt": ("fp8", "channel", None), "int8-wo": ("int8", "channel", None),
            "int4-b128": ("int4", "group", 128), "int4-b64": ("int4", "group", 64), "int4-b64-mse": ("int4", "group", 64),
            "int4-awq": ("int4", "group", 32), "int8-sq": ("int8", "channel", None),
            "fp8-layer0-off": ("fp8", "tensor", None)}


def quantized(config: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir("synthetic:llama-tiny"),
                                                              dtype=torch.bfloat16).eval()
    data = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return mtq.quantize(model, CONFIGS[config](), lambda m: [m(data[i:i + 1]) for i in range(2)])


def exact_fp8_eager(x, amax=None):
    """formats.md section 5 FP8 with the exact division 448 / a (in place of ModelOpt's CPU 448.0 / a)."""
    a = amax.to(torch.float32)
    a = torch.where(a <= 2.0**-24, torch.ones_like(a), a)
    scale = torch.full_like(a, FP8_MAX) / a
    y = (x.to(torch.float32) * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (y.to(torch.float32) * (torch.ones_like(scale) / scale)).to(x.dtype)


def weight_quantizers(model):
    for name, mod in model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is not None and isinstance(mod, torch.nn.Linear):
            yield name, mod, q


@pytest.mark.parametrize("config", list(CONFIGS))
def test_our_fold_equals_the_models_own_quantizer(config, monkeypatch):
    import modelopt.torch.quantization.tensor_quant as tq

    monkeypatch.setattr(tq, "fp8_eager", exact_fp8_eager)
    model = quantized(config)
    assert is_modelopt_quantized(model)
    checked = disabled = 0
    with torch.no_grad():
        for name, mod, q in weight_quantizers(model):
            w = mod.weight.detach()
            if not q.is_enabled:
                disabled += 1
                assert "layers.0." in name or "lm_head" in name, name
                continue
            spec = weight_spec(q, tuple(w.shape), name)
            assert (spec.fmt, spec.granularity, spec.block_size if spec.granularity != "tensor" and
                    spec.granularity != "channel" else None) == EXPECTED[config], name
            amax = amax_in_our_layout(q, spec, tuple(w.shape), name)
            theirs = q(w)
            mine = fake_quant(w, spec, amax)
            assert torch.equal(mine.view(torch.int16), theirs.view(torch.int16)), \
                f"{config} {name}: {(mine != theirs).sum().item()} of {w.numel()} elements differ"
            checked += 1
    assert checked >= 7
    assert (disabled >= 7) == (config == "fp8-layer0-off")


def test_mse_amax_is_the_quantizers_not_the_weights_max():
    """algorithm mse searches the amax: the mapped amax is that calibrated value (it differs from max|W|)."""
    model = quantized("int4-b64-mse")
    name, mod, q = next((n, m, q) for n, m, q in weight_quantizers(model) if q.is_enabled)
    w = mod.weight.detach()
    spec = weight_spec(q, tuple(w.shape), name)
    amax = amax_in_our_layout(q, spec, tuple(w.shape), name)
    blockmax = w.float().abs().reshape(w.shape[0], -1, 64).amax(-1)
    assert amax.shape == blockmax.shape and not torch.equal(amax, blockmax)


@pytest.mark.parametrize("attr,value,what", [("backend", "my_backend", "'my_backend'"), ("_unsigned", True, "unsigned"),
                                             ("_narrow_range", True, "narrow-range")])
def test_unexpressible_quantizer_refused_by_name(attr, value, what):
    model = quantized("fp8")
    q = model.model.layers[0].self_attn.q_proj.weight_quantizer
    setattr(q, attr, value)
    where = "model.layers.0.self_attn.q_proj.weight_quantizer"
    with pytest.raises(ValueError, match=f"{where}.*{what}"):
        weight_spec(q, (64, 64), where)


def test_uncalibrated_weight_quantizer_refused():
    model = quantized("int8-wo")
    q = model.model.layers[0].mlp.down_proj.weight_quantizer
    w = model.model.layers[0].mlp.down_proj.weight
    spec = weight_spec(q, tuple(w.shape), "down")
    del q._amax
    with pytest.raises(ValueError, match="down: .*no calibrated amax"):
        amax_in_our_layout(q, spec, tuple(w.shape), "down")


def test_input_quantizer_record_round_trips_with_torch_alone(tmp_path):
    """Input quantizers keep ModelOpt's own properties and amax; the file loads with weights_only=True."""
    from dist_export.sources.quantizer_state import STATE_FORMAT

    model = quantized("fp8")
    q = model.model.layers[1].self_attn.o_proj.input_quantizer
    path = str(tmp_path / "s.pt")
    save_state({"format": STATE_FORMAT, "inputs": {"o": quantizer_record(q)}}, path)
    back = load_state(path)["inputs"]["o"]
    assert torch.equal(back["buffers"]["_amax"], q._amax.cpu())
    assert back["properties"]["_num_bits"] == q.get_modelopt_state()["_num_bits"]
    torch.save({"format": "other"}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="not a dist_export quantizer state file"):
        load_state(str(tmp_path / "bad.pt"))
