"""`vllm_fq_modelopt_state.pth`: the quantizer state vLLM's fake-quant worker restores (formats.md section 2).

Plain data only (dicts, lists, tuples, str, int, float, bool, None, tensors, torch dtypes), so the file loads
with `torch.load(path, weights_only=True)` in an interpreter that imports nothing but torch. The schema of a
quantizer's properties is ModelOpt 0.47's (`quantizer_state`), filled from our recipe:
  * weight quantizers are absent: their effect is folded into the weights;
  * every quantized Linear gets an input quantizer (disabled where the recipe has none) and a disabled output
    quantizer, as ModelOpt's own export writes them;
  * static input quantizers carry their calibrated amax (0-d, model dtype) in `modelopt_state_weights`.
Names are in checkpoint key space (per-expert names for MoE), the names vLLM's loader maps.
"""
from __future__ import annotations

import torch

from ..calibration.file import input_quantizer_name

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


def input_quantizer_properties(spec, amax_dtype: torch.dtype) -> dict:
    """ModelOpt quantizer properties of one input quantizer (None spec: disabled)."""
    props = _base_properties()
    if spec is None:
        return props
    props["_disabled"] = False
    props["_num_bits"] = {"fp8": (4, 3), "nvfp4": (2, 1), "int8": 8}[spec.fmt]
    props["_dynamic"] = spec.dynamic
    if spec.fmt == "nvfp4":
        props["_block_sizes"] = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
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
    cfg = {"num_bits": {"fp8": (4, 3), "nvfp4": (2, 1), "int8": 8}[spec.fmt], "axis": None,
           "block_sizes": None, "type": "dynamic" if spec.dynamic else "static", "enable": True,
           "fake_quant": True, "unsigned": False, "narrow_range": False, "calibrator": "max"}
    if spec.fmt == "nvfp4":
        cfg["block_sizes"] = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
    elif spec.granularity == "token":
        cfg["block_sizes"] = {-1: None}
    elif spec.granularity == "group":
        cfg["block_sizes"] = {-1: spec.block_size, "type": "dynamic"}
    return cfg


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
    quant_cfg: list[dict] = [{"quantizer_name": "*", "parent_class": None, "cfg": None, "enable": False}]
    for item in sorted((i for i in plan.items.values() if i.quantized), key=lambda i: i.module):
        in_name = input_quantizer_name(item.module)
        qstate[in_name] = input_quantizer_properties(item.input, dtype)
        qstate[f"{item.module}.output_quantizer"] = _base_properties()
        entry = {}
        if item.input is not None and item.input.needs_calibration:
            entry["_amax"] = calib[in_name].to(dtype).reshape(()).clone()
        weights[in_name] = entry
        weights[f"{item.module}.output_quantizer"] = {}
        if item.input is not None:
            quant_cfg.append({"quantizer_name": in_name, "parent_class": None,
                              "cfg": input_quantizer_config(item.input), "enable": True})
    quantize_config = {"quant_cfg": quant_cfg, "algorithm": "max"}
    return {
        "modelopt_state_dict": [
            ("quantize", {"config": quantize_config, "metadata": {"quantizer_state": qstate}}),
            ("max_calibrate", {"config": {"method": "max", "distributed_sync": True},
                               "metadata": {"quantizer_state": qstate}}),
        ],
        "modelopt_version": MODELOPT_VERSION,
        "modelopt_state_weights": weights,
    }
