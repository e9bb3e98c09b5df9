"""A new numeric format is one module: a ternary format registered here, in the test alone, with its facts
(granularities, no MSE search), is accepted by recipes, planned, exported through vllm-fq and recomputed by
`verify --source`, and its facts decide what a recipe may ask of it. No other module is touched."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from helpers import model_dir

TOY = "toy-ternary"


def ternary_reference(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Written from the definition, independently of the format's function: each value becomes -a, 0 or +a
    (a = the row's max|w|), whichever is nearest (ties to 0); computed in float64, cast once to w's dtype."""
    x = w.double()
    a = x.abs().amax(dim=1, keepdim=True) if amax.dim() else x.abs().max()
    ratio = torch.where(a > 0, x / a, torch.zeros_like(x))
    q = torch.where(ratio > 0.5, 1.0, torch.where(ratio < -0.5, -1.0, 0.0))
    return (q * a).to(w.dtype)


@pytest.fixture
def toy_format():
    from dist_export.numerics import spec as numeric_spec
    from dist_export.numerics.blocks import expand_to
    from dist_export.numerics.registry import NumericFormat, register_format

    def fake_quant(x, spec, amax, block_amax=None):
        a = expand_to(amax.float(), x.shape, spec.granularity, spec.block_size)
        q = (2 * x > a).float() - (2 * x < -a).float()
        return q * a

    fmt = register_format(NumericFormat(TOY, fake_quant, granularities=("channel", "tensor")))
    try:
        yield fmt
    finally:
        numeric_spec._FORMATS.pop(TOY, None)


def _recipe(**weight):
    from dist_export.recipe import recipe_from_dict

    return recipe_from_dict({"name": "toy", "rules": [{"match": "*", "weight": {"format": TOY, **weight}}]},
                            source="test")


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_registered_numeric_format_exports_and_verifies(toy_format, tmp_path):
    from dist_export import export
    from dist_export.verify import verify_export

    src = model_dir("synthetic:qwen3-tiny")
    recipe = _recipe()
    assert recipe.rules[0].weight.granularity == "channel"  # the format's first granularity is the default
    out = str(tmp_path / "toy")
    export(src, out, recipe=recipe, format="vllm-fq", verify=False)
    got, source = _tensors(out), _tensors(src)
    quantized = [n for n in got if n.endswith("proj.weight")]
    assert quantized and set(got) == set(source)
    for name in quantized:
        want = ternary_reference(source[name], source[name].float().abs().amax(dim=1, keepdim=True))
        assert torch.equal(got[name], want), name
        assert len(torch.unique(got[name][0])) <= 3
    for name in set(got) - set(quantized):
        assert torch.equal(got[name], source[name]), name  # excluded tensors pass through unchanged

    report = verify_export(out, source_dir=src)
    assert report["ok"] and report["recomputed"] == len(got), report


def test_registered_numeric_format_facts_decide_what_recipes_may_ask(toy_format):
    with pytest.raises(ValueError, match=r"does not support granularity 'group'; valid: \['channel', 'tensor'\]"):
        _recipe(granularity="group", block_size=8)
    with pytest.raises(ValueError, match=f"scale_search 'mse' is not implemented for '{TOY}'"):
        _recipe(scale_search="mse")
    from dist_export.recipe import recipe_from_dict

    with pytest.raises(ValueError, match="input quantizer format .* is not supported"):
        recipe_from_dict({"name": "toy", "rules": [{"match": "*", "weight": {"format": TOY},
                                                    "input": {"format": TOY}}]}, source="test")
