"""`vllm_fq_modelopt_state.pth` (formats.md section 2): loadable by plain PyTorch, and restorable by ModelOpt.

1. The file loads with `torch.load(weights_only=True)` in a fresh interpreter that imports nothing but torch, and
   holds what the consumer needs: no weight quantizers, an input quantizer per quantized Linear, a 0-d `_amax` in
   the model dtype for static inputs (the calibration value cast to bf16), none for dynamic ones.
2. Where ModelOpt is installed (test-only; never a runtime dependency, not installed in CI), the file is restored
   onto a fresh transformers Llama with the same sequence as ModelOpt's vLLM fake-quant worker, and the restored
   quantizers and a CPU forward are checked.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

MODEL = "synthetic:llama-tiny"
STATE_FILE = "vllm_fq_modelopt_state.pth"
MODEL_DTYPE = torch.bfloat16
STATIC_RECIPES = ("fp8", "nvfp4")
DYNAMIC_RECIPES = ("fp8-pc-pt", "int8-w8a8")
_QUANTIZED_WEIGHT = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.weight$")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, synthetic_cache):
    """recipe -> (export folder, calibration file or None); each export is made once per module, on first use."""
    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe
    from dist_export.sources.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("state_file")
    made: dict[str, tuple[str, str | None] | BaseException] = {}

    def get(recipe: str) -> tuple[str, str | None]:
        if recipe not in made:
            try:
                src = ensure_synthetic(MODEL)
                rec = load_recipe(recipe)
                calib = None
                if rec.needs_calibration:
                    calib = str(root / f"calib-{recipe}.safetensors")
                    calibrate(src, rec, calib, random_tokens=True, num_samples=4, seq_len=32)
                out = str(root / f"out-{recipe}")
                export(src, out, recipe=recipe, format="vllm-fq", calib=calib)
                made[recipe] = (out, calib)
            except Exception as e:
                made[recipe] = e  # a later test of this recipe reports this failure, not a non-empty folder
                raise
        if isinstance(made[recipe], BaseException):
            pytest.fail(f"the {recipe} export failed earlier in this module: {made[recipe]!r}")
        return made[recipe]

    return get


def quantized_modules(out_dir: str) -> list[str]:
    """The Linear modules the recipes quantize in llama-tiny (every projection of every decoder layer)."""
    mods = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, name), "pt") as f:
                mods += [m.group(1) for k in f.keys() if (m := _QUANTIZED_WEIGHT.match(k))]
    return sorted(mods)


# Runs in a fresh interpreter: torch only. Prints a JSON summary of the file.
_TORCH_ONLY_SUMMARY = r"""
import json, sys
import torch

state = torch.load(sys.argv[1], weights_only=True, map_location="cpu")

def props(p):
    meta = p.get("_pytorch_state_metadata", {})
    return {
        "_disabled": p.get("_disabled"), "_dynamic": p.get("_dynamic"), "_num_bits": repr(p.get("_num_bits")),
        "_axis": repr(p.get("_axis")), "_block_sizes": repr(p.get("_block_sizes")),
        "buffers": {b: {"shape": list(d["shape"]), "dtype": str(d["dtype"])}
                    for b, d in meta.get("buffers", {}).items()},
    }

summary = {
    "top_keys": sorted(state),
    "version": state.get("modelopt_version"),
    "modes": [[mode, {"config_keys": sorted(entry["config"]),
                      "quantizer_state": {k: props(v)
                                          for k, v in entry["metadata"].get("quantizer_state", {}).items()}}]
              for mode, entry in state["modelopt_state_dict"]],
    "weights": {k: {b: {"shape": list(t.shape), "dtype": str(t.dtype), "value": t.float().tolist()}
                    for b, t in v.items()}
                for k, v in state["modelopt_state_weights"].items()},
}
leaked = sorted(m for m in ("transformers", "dist_export", "modelopt", "safetensors") if m in sys.modules)
assert "transformers" not in sys.modules and "dist_export" not in sys.modules, leaked
summary["imported_besides_torch"] = leaked
print(json.dumps(summary))
"""


def load_with_torch_only(path: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _TORCH_ONLY_SUMMARY, path], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(path), timeout=120)
    assert proc.returncode == 0, f"torch-only weights_only load failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("recipe", STATIC_RECIPES + DYNAMIC_RECIPES)
def test_state_file_loads_with_torch_only(exports, recipe):
    out, calib_path = exports(recipe)
    summary = load_with_torch_only(os.path.join(out, STATE_FILE))
    assert summary["imported_besides_torch"] == []
    assert summary["top_keys"] == ["modelopt_state_dict", "modelopt_state_weights", "modelopt_version"]
    assert isinstance(summary["version"], str) and summary["version"]
    assert [m for m, _ in summary["modes"]][:1] == ["quantize"]

    weights = summary["weights"]
    mode_states = [(m, e["quantizer_state"]) for m, e in summary["modes"] if e["quantizer_state"]]
    assert mode_states and mode_states[0][0] == "quantize"

    # Weight quantizers are absent everywhere: their effect is folded into the weights.
    for mode, qs in mode_states:
        assert not [k for k in qs if "weight_quantizer" in k], mode
    assert not [k for k in weights if "weight_quantizer" in k]

    modules = quantized_modules(out)
    assert len(modules) == 14, modules  # 2 layers x (q, k, v, o, gate, up, down)
    calib = load_file(calib_path) if calib_path else {}
    dynamic = recipe in DYNAMIC_RECIPES
    want_dtype = str(MODEL_DTYPE)
    for module in modules:
        name = f"{module}.input_quantizer"
        for mode, qs in mode_states:
            assert name in qs, f"{mode}: no input quantizer for quantized Linear {module}"
            p = qs[name]
            assert p["_disabled"] is False, (mode, name)
            assert p["_dynamic"] is dynamic, (mode, name, p)
            if dynamic:
                assert p["buffers"] == {}, (mode, name, p)
            else:
                # A declared buffer is what makes ModelOpt register `_amax` before it loads the tensor.
                assert p["buffers"] == {"_amax": {"shape": [], "dtype": want_dtype}}, (mode, name, p)
        assert name in weights, name
        if dynamic:
            assert "_amax" not in weights[name], (name, weights[name])
        else:
            amax = weights[name].get("_amax")
            assert amax is not None, f"static input quantizer {name} has no _amax"
            assert amax["shape"] == [] and amax["dtype"] == want_dtype, (name, amax)
            want = calib[name].to(MODEL_DTYPE).float().item()
            assert amax["value"] == want, (name, amax["value"], calib[name].item())


# ------------------------------------------------------------------------------------------------------------
# ModelOpt restore (test-only dependency)
# ------------------------------------------------------------------------------------------------------------
def _restore_as_vllm_worker_does(model, modelopt_state: dict):
    """Apply a vllm-fq state file's modes to a plain HF model the way ModelOpt's fake-quant worker does.

    The worker cannot use `mto.restore_from_modelopt_state`: that demands an exact quantizer key match and the
    file has no weight quantizers. Instead, per mode that carries a quantizer state:
      * convert the model once with the file's quantize config (inserts TensorQuantizers, applies quant_cfg);
      * take the file's state for each quantizer the model has, except for quantizers the config left disabled
        whose saved state declares no buffers (those keep the converted state); quantizers the file does not
        name keep the converted state, weight quantizers forced disabled (the file's weights are folded);
      * restore those states with ModelOpt's `restore_quantizer_state`.
    No HF -> vLLM renaming: the target is the HF model, whose module names are the file's.
    """
    from modelopt.torch.export.plugins.vllm_fakequant_hf import is_weight_quantizer_state_key
    from modelopt.torch.opt.conversion import ModeloptStateManager
    from modelopt.torch.quantization.conversion import (convert_to_quantized_model, quantizer_state,
                                                        restore_quantizer_state)
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
    from modelopt.torch.quantization.utils import is_quantized
    from modelopt.torch.utils import get_unwrapped_name

    manager = ModeloptStateManager(model=model, init_state=True)
    manager.load_state_dict(modelopt_state["modelopt_state_dict"], modelopt_state["modelopt_version"])
    for mode, config, metadata in manager.modes_with_states():
        if "quantizer_state" not in metadata:
            model = mode.restore(model, config, metadata)
            continue
        if not is_quantized(model):
            convert_to_quantized_model(model, config)
        converted = quantizer_state(model)
        off_after_convert = {get_unwrapped_name(n, model) for n, m in model.named_modules()
                             if isinstance(m, (TensorQuantizer, SequentialQuantizer)) and not m.is_enabled}
        saved = metadata["quantizer_state"]
        merged = {}
        for key, own in converted.items():
            file_state = saved.get(key)
            if file_state is not None and (
                    key not in off_after_convert
                    or file_state.get("_pytorch_state_metadata", {}).get("buffers")):
                merged[key] = file_state
            elif is_weight_quantizer_state_key(key):
                merged[key] = {**own, "_disabled": True}
            else:
                merged[key] = own
        metadata["quantizer_state"] = merged
        model = restore_quantizer_state(model, config, metadata)
    return model


@pytest.mark.parametrize("recipe", ("fp8", "fp8-pc-pt", "int8-w8a8"))
def test_modelopt_restores_state(exports, recipe):
    pytest.importorskip("modelopt")
    import warnings

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.plugins.vllm_fakequant_hf import is_weight_quantizer_state_key
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import LlamaForCausalLM

    out, _ = exports(recipe)
    # The consumer loads with weights_only (its safe_load); `modelopt_state_weights` goes in after the restore.
    state = torch.load(os.path.join(out, STATE_FILE), weights_only=True, map_location="cpu")
    file_qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    file_weights = state.pop("modelopt_state_weights")

    model = LlamaForCausalLM.from_pretrained(out, dtype=MODEL_DTYPE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _restore_as_vllm_worker_does(model, state)
        mtq.utils.set_quantizer_state_dict(model, file_weights)
        mtq.fold_weight(model)

    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    enabled_weight_q = [n for n, m in quantizers.items() if is_weight_quantizer_state_key(n) and m.is_enabled]
    assert enabled_weight_q == [], f"weight quantizers still enabled after fold_weight: {enabled_weight_q[:4]}"

    dynamic = recipe in DYNAMIC_RECIPES
    modules = quantized_modules(out)
    assert len(modules) == 14, modules
    for module in modules:
        name = f"{module}.input_quantizer"
        q = quantizers.get(name)
        assert q is not None, f"ModelOpt made no input quantizer for {module}"
        assert q.is_enabled, f"{name} restored disabled"
        assert q.num_bits == file_qs[name]["_num_bits"], (name, q.num_bits)
        assert bool(q._dynamic) is dynamic, (name, q._dynamic)
        if dynamic:
            assert getattr(q, "_amax", None) is None, f"dynamic {name} restored with an amax"
        else:
            want = file_weights[name]["_amax"]
            got = q.amax
            assert got is not None, f"static {name} restored without amax"
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), \
                (name, got, want)

    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------------------
# The quantize config matches vLLM's fused module names (ModelOpt's own matching, test-only dependency)
# ------------------------------------------------------------------------------------------------------------
_VLLM_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _vllm_named_model(hidden: int = 64) -> torch.nn.Module:
    """Plain Linears under the module names vLLM gives llama-tiny's fused layers (2 layers), plus lm_head."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
        for path in _VLLM_LINEARS:
            parent, name = path.split(".")
            setattr(getattr(layer, parent), name, torch.nn.Linear(hidden, hidden, bias=False))
        root.model.layers.append(layer)
    root.lm_head = torch.nn.Linear(hidden, 256, bias=False)
    return root.to(MODEL_DTYPE)


def _fp8_reference(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """formats.md section 5, FP8 E4M3 with the given amax (broadcast)."""
    a = amax.float()
    a = torch.where(a <= 2**-24, torch.ones_like(a), a)
    inv = 1.0 / (448.0 / a)
    return (x.float() * (448.0 / a)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * inv


@pytest.mark.parametrize("recipe", ("fp8", "fp8-pc-pt"))
def test_quant_cfg_enables_vllm_fused_modules(exports, recipe):
    """ModelOpt's convert with the file's quant_cfg, on vLLM's module names: every fused Linear's input quantizer
    is enabled (so the worker keeps its saved state, dynamic ones included), lm_head's is off, and a dynamic
    per-token quantizer quantizes each row with its own amax (formats.md), not the tensor's."""
    pytest.importorskip("modelopt")
    from modelopt.torch.opt.conversion import ModeloptStateManager
    from modelopt.torch.quantization.conversion import convert_to_quantized_model

    out, _ = exports(recipe)
    state = torch.load(os.path.join(out, STATE_FILE), weights_only=True, map_location="cpu")
    config = state["modelopt_state_dict"][0][1]["config"]
    assert config["quant_cfg"][1]["quantizer_name"] == "*input_quantizer", config["quant_cfg"][:2]
    model = _vllm_named_model()
    ModeloptStateManager(model=model, init_state=True)
    convert_to_quantized_model(model, config)
    dynamic = recipe in DYNAMIC_RECIPES
    for i in range(2):
        for path in _VLLM_LINEARS:
            q = model.get_submodule(f"model.layers.{i}.{path}").input_quantizer
            assert q.is_enabled, f"layers.{i}.{path}.input_quantizer disabled by the file's quant_cfg"
            assert bool(q._dynamic) is dynamic and q.num_bits == (4, 3), (path, q)
            assert not model.get_submodule(f"model.layers.{i}.{path}").weight_quantizer.is_enabled
    assert not model.lm_head.input_quantizer.is_enabled
    if dynamic:
        q = model.model.layers[0].self_attn.qkv_proj.input_quantizer
        x = torch.randn(6, 64) * torch.logspace(-2, 1, 6).view(-1, 1)
        x = x.to(MODEL_DTYPE)
        with torch.no_grad():
            got = q(x).float()
        per_token = _fp8_reference(x, x.float().abs().amax(dim=-1, keepdim=True)).to(MODEL_DTYPE).float()
        per_tensor = _fp8_reference(x, x.float().abs().amax()).to(MODEL_DTYPE).float()
        assert not torch.equal(per_token, per_tensor)
        assert torch.equal(got, per_token), (got - per_token).abs().max()


def test_vllm_fq_warns_where_cpu_worker_cannot_run(tmp_path, synthetic_cache, caplog):
    """fp8-block's dynamic block activations cannot run in ModelOpt 0.47's worker on CPU: the export says so."""
    import logging

    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    with caplog.at_level(logging.WARNING, logger="dist_export.api"):
        export(ensure_synthetic(MODEL), str(tmp_path / "out"), recipe="fp8-block", format="vllm-fq")
    lines = [r.getMessage() for r in caplog.records if "serve this export on a GPU" in r.getMessage()]
    assert len(lines) == 1 and "scale_bits" in lines[0] and "groups of 128" in lines[0], lines


@pytest.mark.parametrize("recipe, modelopt_cfg", [("mxfp8-w8a8", "MXFP8_DEFAULT_CFG"), ("mxfp4-w4a4", "MXFP4_DEFAULT_CFG")])
def test_mx_input_quantizers_equal_modelopts_own(exports, recipe, modelopt_cfg):
    """MX activations are exported for ModelOpt's worker in ModelOpt's own settings: every input quantizer of the
    file equals, property for property, the one ModelOpt 0.47 makes from its MX*_DEFAULT_CFG on the same model
    (no amax: the consumer computes the block scales at run time; its MX kernel is CUDA-only, so no forward here),
    and the file's quant_cfg converts the model to exactly those quantizers."""
    pytest.importorskip("modelopt")
    import warnings

    import modelopt.torch.quantization as mtq
    from modelopt.torch.opt.conversion import ModeloptStateManager
    from modelopt.torch.quantization.conversion import convert_to_quantized_model, quantizer_state
    from transformers import LlamaForCausalLM

    out, calib = exports(recipe)
    assert calib is None  # dynamic: nothing to calibrate
    state = torch.load(os.path.join(out, STATE_FILE), weights_only=True, map_location="cpu")
    file_qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mtq.quantize(LlamaForCausalLM.from_pretrained(out, dtype=MODEL_DTYPE).eval(),
                              getattr(mtq, modelopt_cfg), None)
        from_file = LlamaForCausalLM.from_pretrained(out, dtype=MODEL_DTYPE).eval()
        ModeloptStateManager(model=from_file, init_state=True)
        convert_to_quantized_model(from_file, state["modelopt_state_dict"][0][1]["config"])
    their_qs, converted = quantizer_state(theirs), quantizer_state(from_file)
    modules = quantized_modules(out)
    assert len(modules) == 14, modules
    for module in modules:
        name = f"{module}.input_quantizer"
        assert file_qs[name] == their_qs[name], (name, file_qs[name], their_qs[name])
        assert converted[name] == their_qs[name], (name, converted[name])
    assert not [k for k in state["modelopt_state_weights"] if "_amax" in state["modelopt_state_weights"][k]]
