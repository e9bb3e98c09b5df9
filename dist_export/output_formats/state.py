"""`vllm_fq_modelopt_state.pth`: the quantizer state vLLM's fake-quant worker restores (formats.md section 2).

Plain data only (dicts, lists, tuples, str, int, float, bool, None, tensors, torch dtypes), so the file loads
with `torch.load(path, weights_only=True)` in an interpreter that imports nothing but torch. The schema of a
quantizer's properties is ModelOpt 0.47's (`quantizer_state`), filled from our recipe:
  * weight quantizers are absent: their effect is folded into the weights;
  * every quantized Linear gets an input quantizer (disabled where the recipe has none) and a disabled output
    quantizer, as ModelOpt's own export writes them;
  * static input quantizers carry their calibrated amax (0-d, model dtype) in `modelopt_state_weights`;
  * with recipe `kv_cache: fp8`, each attention layer's `k_bmm_quantizer` / `v_bmm_quantizer` (ModelOpt's K/V
    quantizers, `<attention>.k_bmm_quantizer` in the HF model, `<attention>.attn.k_bmm_quantizer` once the
    worker maps it onto vLLM's Attention) is static FP8 per tensor with its calibrated amax, enabled by a
    `*[kv]_bmm_quantizer` entry as in ModelOpt's FP8_KV_CFG.
Names are in checkpoint key space (per-expert names for MoE), the names vLLM's loader maps.

The quantize config is in ModelOpt's own shape: everything off, one wildcard `*input_quantizer` entry for the
most common input quantizer, then per-module entries (exclusions and other specs) under both the Hugging Face
name and the name vLLM gives the fused module (`qkv_proj`, `gate_up_proj`, `experts*w13_`/`w2_`). The worker
converts vLLM's model with this config and then drops the saved state of every quantizer the config left
disabled unless it declares buffers, so a config that named only Hugging Face modules left vLLM's fused modules
(and every dynamic quantizer on them) disabled. Runs on rank 0 at commit.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from ..calibration.file import input_quantizer_name
from ..numerics import get_format

MODELOPT_VERSION = "0.47.0"  # the version string of the schema we write; the consumer checks it


def _base_properties() -> dict:
    return {
        "_disabled": True, "_dynamic": False, "_num_bits": 8, "_axis": None, "_block_sizes": None,
        "_bias": None, "_input_dtype": None, "backend": None, "backend_extra_args": {},
        "_rotate": False, "_unsigned": False, "_effective_bits": None, "_if_calib": False, "_dequantize": False,
        "_if_quant": True, "_enable_pre_quant_scale": True, "_narrow_range": False, "_learn_amax": False,
        "_fake_quant": True, "_trt_high_precision_dtype": "Float", "_pass_through_bwd": True,
        "_constant_amax": None, "_use_constant_amax": False,
        "_pytorch_state_metadata": {"params": {}, "buffers": {}},
    }


def _own_copy(value, shared: dict):
    """`value` with every tuple replaced by this module's one copy of it. Pickle memoizes by identity, so the
    formats' own tuple objects would change the file's bytes (not its content); one copy per value keeps them as
    they were when this module spelled the tuples as literals (which Python merges into one constant)."""
    if isinstance(value, dict):
        return {k: _own_copy(v, shared) for k, v in value.items()}
    if isinstance(value, tuple):
        return shared.setdefault(value, tuple(list(value)))
    return value


_TUPLES: dict = {}


def modelopt_dynamic(spec, fmt) -> bool:
    """ModelOpt's `_dynamic` (config `type`) for an input quantizer. MX formats (E8M0 block scales, `scale_bits`
    (8, 0)) use no amax at all: their block scales are always computed per call, and ModelOpt 0.47 converts its
    MXFP8/MXFP4_DEFAULT_CFG with `_dynamic` False (measured), so their state says False too."""
    if (fmt.modelopt_block_sizes or {}).get("scale_bits") == (8, 0):
        return False
    return spec.dynamic


def input_quantizer_properties(spec, amax_dtype: torch.dtype) -> dict:
    """ModelOpt quantizer properties of one input quantizer (None spec: disabled)."""
    props = _base_properties()
    if spec is None:
        return props
    fmt = get_format(spec.fmt)
    props["_disabled"] = False
    props["_num_bits"] = _own_copy(fmt.modelopt_num_bits, _TUPLES)
    props["_dynamic"] = modelopt_dynamic(spec, fmt)
    if fmt.modelopt_block_sizes is not None:
        props["_block_sizes"] = _own_copy(fmt.modelopt_block_sizes, _TUPLES)
    elif spec.granularity == "token":
        # One amax per row of the 2-D activations vLLM feeds. ModelOpt itself saves _axis (0, 1), which on 2-D
        # inputs reduces to a single per-tensor amax: measured with ModelOpt 0.47, so we do not copy it.
        props["_block_sizes"] = {-1: None}
    elif spec.granularity == "group":
        props["_block_sizes"] = {-1: spec.block_size, "type": "dynamic"}
    if spec.needs_calibration:
        props["_pytorch_state_metadata"] = {"params": {}, "buffers": {"_amax": {"shape": (), "dtype": amax_dtype}}}
    return props


def input_quantizer_config(spec) -> dict:
    """The quantize-config `cfg` of an input quantizer, in ModelOpt's schema."""
    fmt = get_format(spec.fmt)
    cfg = {"num_bits": _own_copy(fmt.modelopt_num_bits, _TUPLES), "axis": None,
           "block_sizes": None, "type": "dynamic" if modelopt_dynamic(spec, fmt) else "static", "enable": True,
           "fake_quant": True, "unsigned": False, "narrow_range": False, "calibrator": "max"}
    if fmt.modelopt_block_sizes is not None:
        cfg["block_sizes"] = _own_copy(fmt.modelopt_block_sizes, _TUPLES)
    elif spec.granularity == "token":
        cfg["block_sizes"] = {-1: None}
    elif spec.granularity == "group":
        cfg["block_sizes"] = {-1: spec.block_size, "type": "dynamic"}
    return cfg


# Hugging Face module name -> the name of the same quantizer in vLLM's fused module (ModelOpt's worker rules).
_VLLM_FUSED = (
    (re.compile(r"\.experts\.\d+\.(?:gate|up)_proj$"), ".experts*w13_"),
    (re.compile(r"\.experts\.\d+\.down_proj$"), ".experts*w2_"),
    (re.compile(r"\.[qkv]_proj$"), ".qkv_proj."),
    (re.compile(r"\.(?:gate|up)_proj$"), ".gate_up_proj."),
)


def input_quantizer_patterns(module: str) -> list[str]:
    """quant_cfg patterns naming `module`'s input quantizer in the HF model and in vLLM's fused model."""
    patterns = [f"*{module}.input_quantizer"]
    for regex, fused in _VLLM_FUSED:
        if regex.search(module):
            patterns.append("*" + regex.sub(fused, module) + "input_quantizer")
            break
    return patterns


def _cfg_key(cfg: dict | None) -> str:
    return repr(cfg)  # configs come from one builder, so equal configs have equal key order


def build_quant_cfg(plan) -> list[dict]:
    """ModelOpt-shaped quant_cfg: all off, the most common input spec as `*input_quantizer`, then overrides."""
    per_module = {item.module: (input_quantizer_config(item.input) if item.input is not None else None)
                  for item in plan.items.values() if item.quantized}
    from . import unquantized_linear_modules

    for module in unquantized_linear_modules(plan):
        per_module.setdefault(module, None)
    counts = Counter(_cfg_key(c) for m, c in per_module.items() if c is not None)
    quant_cfg: list[dict] = [{"quantizer_name": "*", "parent_class": None, "cfg": None, "enable": False}]
    default = counts.most_common(1)[0][0] if counts else None
    if default is not None:
        cfg = next(c for c in per_module.values() if c is not None and _cfg_key(c) == default)
        quant_cfg.append({"quantizer_name": "*input_quantizer", "parent_class": None, "cfg": cfg, "enable": True})
    quant_cfg.append({"quantizer_name": "*lm_head*", "parent_class": None, "cfg": None, "enable": False})
    seen = set()
    kv = _KV_SPEC if any(i.kv for i in plan.items.values()) else None
    for module in sorted(per_module):
        cfg = per_module[module]
        if default is not None and cfg is not None and _cfg_key(cfg) == default:
            continue
        for pattern in input_quantizer_patterns(module):
            if pattern in seen:
                continue
            seen.add(pattern)
            quant_cfg.append({"quantizer_name": pattern, "parent_class": None, "cfg": cfg,
                              "enable": cfg is not None})
    if kv is not None:
        quant_cfg.append({"quantizer_name": "*[kv]_bmm_quantizer", "parent_class": None,
                          "cfg": input_quantizer_config(kv), "enable": True})
    return quant_cfg


def _kv_spec():
    from ..recipe import InputSpec

    return InputSpec("fp8", "tensor", None, False)  # static FP8 per tensor: what recipe kv_cache: fp8 means


# Input quantizers ModelOpt 0.47's fake quant cannot run on CPU (measured; formats.md section 2).
def cpu_unsupported_reason(spec) -> str | None:
    """Why ModelOpt 0.47's vLLM worker cannot run this input quantizer on a CPU device, or None."""
    if spec is None:
        return None
    if get_format(spec.fmt).cpu_input_reason:
        return get_format(spec.fmt).cpu_input_reason
    if spec.granularity == "group":
        return (f"dynamic FP8 block activation quant (groups of {spec.block_size}) asserts on `scale_bits` in "
                f"ModelOpt 0.47's _dynamic_block_quantize_forward on CPU (needs a GPU)")
    return None


_KV_SPEC = _kv_spec()


def _model_dtype(plan) -> torch.dtype:
    from ..storage.header import ST_TO_DTYPE

    for item in plan.items.values():
        if item.quantized:
            return ST_TO_DTYPE[item.meta.dtype]
    return torch.bfloat16


def build_vllm_fq_state(plan, recipe, calib: dict[str, torch.Tensor]) -> dict:
    dtype = _model_dtype(plan)
    qstate: dict[str, dict] = {}
    weights: dict[str, dict] = {}
    for item in sorted((i for i in plan.items.values() if i.quantized), key=lambda i: i.module):
        in_name = input_quantizer_name(item.module)
        qstate[in_name] = input_quantizer_properties(item.input, dtype)
        qstate[f"{item.module}.output_quantizer"] = _base_properties()
        entry = {}
        if item.input is not None and item.input.needs_calibration:
            entry["_amax"] = calib[in_name].to(dtype).reshape(()).clone()
        weights[in_name] = entry
        weights[f"{item.module}.output_quantizer"] = {}
        if item.kv:
            qstate[item.kv] = input_quantizer_properties(_KV_SPEC, dtype)
            weights[item.kv] = {"_amax": calib[item.kv].to(dtype).reshape(()).clone()}
    quantize_config = {"quant_cfg": build_quant_cfg(plan), "algorithm": "max"}
    return {
        "modelopt_state_dict": [
            ("quantize", {"config": quantize_config, "metadata": {"quantizer_state": qstate}}),
            ("max_calibrate", {"config": {"method": "max", "distributed_sync": True},
                               "metadata": {"quantizer_state": qstate}}),
        ],
        "modelopt_version": MODELOPT_VERSION,
        "modelopt_state_weights": weights,
    }


def state_from_quantizers(values) -> dict:
    """The state file of an export whose recipe is the model's own ModelOpt quantizers (`QuantizerValues`):
    ModelOpt's mode list and configs, and every non-weight quantizer with ModelOpt's own properties and buffers
    (inputs, outputs, KV-cache `*_bmm_quantizer`; fused experts' shared ones under each expert's names), as
    ModelOpt's exporter writes them. A pre-quant scale folded into the weights is saved as ones, as ModelOpt does."""
    from ..plan import natural_key

    folded = {f"{n[: -len('.weight')]}.input_quantizer" for n, (_, pqs) in values.weights.items() if pqs is not None}
    qstate, weights = {}, {}
    for path in sorted(values.activations, key=natural_key):
        record = values.activations[path]
        qstate[path] = record["properties"]
        buffers = dict(record["buffers"])
        if path in folded and "_pre_quant_scale" in buffers:
            buffers["_pre_quant_scale"] = torch.ones_like(buffers["_pre_quant_scale"])
        weights[path] = buffers
    modes = []
    for (mode, config), meta in zip(values.modes, values.mode_metadata):
        rest = {k: v for k, v in meta.items() if k != "has_quantizer_state"}
        meta = ({"quantizer_state": qstate} if meta["has_quantizer_state"] else {}) | rest
        modes.append((mode, {"config": config, "metadata": meta}))
    return {"modelopt_state_dict": modes, "modelopt_version": values.version, "modelopt_state_weights": weights}
