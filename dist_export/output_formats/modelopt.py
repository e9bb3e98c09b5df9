"""`--format modelopt`: ModelOpt's Hugging Face real-quant layout for FP8 per tensor and NVFP4 (formats.md 4).

| algo  | weight               | weight_scale              | others                                               |
| FP8   | F8_E4M3 [N, K]       | F32 [] (exact fold `inv`) | input_scale F32 [] = act_amax / 448                  |
| NVFP4 | U8 [N, K/2] (packed) | F8_E4M3 [N, ceil(K/16)]   | weight_scale_2 F32 [] = amax/2688; input_scale = act_amax/2688 |

Stored scales are exactly the multipliers of the fake-quant fold, so dequantization equals the `vllm-fq`
export bit for bit. vLLM fuses q/k/v and gate/up: their input scales are one value per fused group (max), and
NVFP4 `weight_scale_2` agree because the recipe shares the weight amax over those groups (collectively when
members sit on different ranks).
"""
from __future__ import annotations

import json

import torch

from .. import __version__
from ..layout import HF_QUANT_CONFIG_NAME
from ..numerics import quantize
from ..numerics.constants import F8E4M3_MAX, NVFP4_GLOBAL_DIVISOR
from ..plan import OutSpec
from . import OutputFormat, refuse_expert_stacks, register_output_format, unquantized_linear_modules

# Projections vLLM fuses into one layer (one input scale each group).


def quant_algo(item) -> str:
    w = item.weight
    if w.fmt == "fp8" and w.granularity == "tensor":
        algo = "FP8"
    elif w.fmt == "nvfp4":
        algo = "NVFP4"
    else:
        raise ValueError(
            f"--format modelopt stores FP8 per-tensor and NVFP4 weights; {item.module} is {w.fmt}/{w.granularity}: "
            f"use --format vllm-fq (or fp8-block for 128x128 FP8 blocks)"
        )
    if item.input is None or item.input.dynamic or item.input.fmt != {"FP8": "fp8", "NVFP4": "nvfp4"}[algo]:
        raise ValueError(
            f"--format modelopt {algo} needs a static {algo} input quantizer (calibrated); {item.module} has "
            f"{item.input}: use the {'fp8' if algo == 'FP8' else 'nvfp4'} recipe or --format vllm-fq"
        )
    return algo


class ModelOptHF(OutputFormat):
    name = "modelopt"

    def check_items(self, items, recipe):
        refuse_expert_stacks(items, self.name)
        for item in items:
            if item.quantized:
                quant_algo(item)

    def outputs(self, item):
        if not item.quantized:
            return super().outputs(item)
        n, k = item.meta.shape
        m = item.module
        if quant_algo(item) == "FP8":
            return [OutSpec(item.name, "F8_E4M3", (n, k)), OutSpec(f"{m}.weight_scale", "F32", ()),
                    OutSpec(f"{m}.input_scale", "F32", ())]
        return [OutSpec(item.name, "U8", (n, k // 2)), OutSpec(f"{m}.weight_scale", "F8_E4M3", (n, -(-k // 16))),
                OutSpec(f"{m}.weight_scale_2", "F32", ()), OutSpec(f"{m}.input_scale", "F32", ())]

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        m = item.module
        t = quantize(w, item.weight, amax, block_amax, name=item.name)
        if quant_algo(item) == "FP8":
            return [(item.name, t["qdata"]), (f"{m}.weight_scale", t["scale_inv"].reshape(())),
                    (f"{m}.input_scale", (input_amax.float() / F8E4M3_MAX).reshape(()).to(w.device))]
        return [(item.name, t["qdata"]), (f"{m}.weight_scale", t["weight_scale"]),
                (f"{m}.weight_scale_2", t["weight_scale_2"]),
                (f"{m}.input_scale", (input_amax.float() / NVFP4_GLOBAL_DIVISOR).reshape(()).to(w.device))]

    def _quantization(self, plan) -> dict:
        algos = {i.module: quant_algo(i) for i in plan.items.values() if i.quantized}
        kinds = sorted(set(algos.values()))
        q: dict = {"quant_algo": kinds[0] if len(kinds) == 1 else "MIXED_PRECISION", "kv_cache_quant_algo": None}
        if "NVFP4" in kinds:
            q["group_size"] = 16
        q["exclude_modules"] = unquantized_linear_modules(plan)
        if len(kinds) > 1:
            q["quantized_layers"] = {
                m: ({"quant_algo": a, "group_size": 16} if a == "NVFP4" else {"quant_algo": a})
                for m, a in sorted(algos.items())
            }
        return q

    def update_config(self, config, plan, recipe):
        config = dict(config)
        config["quantization_config"] = {"quant_method": "modelopt", **self._quantization(plan),
                                         "producer": {"name": "dist_export", "version": __version__}}
        return config

    def extra_files(self, plan, recipe, calib):
        hf = {"producer": {"name": "dist_export", "version": __version__}, "quantization": self._quantization(plan)}
        return {HF_QUANT_CONFIG_NAME: (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()}


register_output_format(ModelOptHF())
