"""`--format fp8-block`: the native `quant_method: "fp8"` layout (DeepSeek/Qwen FP8), formats.md section 3.

Per quantized Linear: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` float32 [ceil(out/128),
ceil(in/128)] holding the dequant multiplier (the exact `inv` of the fold, so codes * scale_inv reproduces the
fake-quant fold bit for bit). Weight-only and dynamic-activation recipes write the same tensors.
"""
from __future__ import annotations

import logging

from ..numerics import quantize
from ..plan import OutSpec
from . import OutputFormat, refuse_expert_stacks, register_output_format, unquantized_linear_modules

log = logging.getLogger(__name__)
BLOCK = 128


class NativeFp8Block(OutputFormat):
    name = "fp8-block"

    def check_items(self, items, recipe):
        refuse_expert_stacks(items, self.name)
        ragged = []
        for item in items:
            if not item.quantized:
                continue
            w = item.weight
            if (w.fmt, w.granularity, w.block_size) != ("fp8", "block", BLOCK):
                raise ValueError(
                    f"--format fp8-block stores only FP8 128x128 block weights, but recipe {recipe.name!r} gives "
                    f"{item.module} {w.fmt}/{w.granularity}/{w.block_size}; use --format vllm-fq or modelopt"
                )
            if item.input is not None and not (item.input.fmt == "fp8" and item.input.dynamic):
                raise ValueError(
                    f"--format fp8-block quantizes activations dynamically at run time; {item.module} has a static "
                    f"{item.input.fmt} input quantizer: use the fp8-block recipe or another --format"
                )
            out, inp = item.meta.shape
            if out % BLOCK or inp % BLOCK:
                ragged.append(f"{item.module} {list(item.meta.shape)}")
        if ragged:
            log.warning("%d quantized weights have a dimension that is not a multiple of %d (e.g. %s); they are "
                        "written with a ceil scale grid, which vLLM reads, but transformers dequantizes such "
                        "tensors incorrectly", len(ragged), BLOCK, ", ".join(ragged[:3]))

    def outputs(self, item):
        if not item.quantized:
            return super().outputs(item)
        out, inp = item.meta.shape
        return [
            OutSpec(item.name, "F8_E4M3", item.meta.shape),
            OutSpec(f"{item.module}.weight_scale_inv", "F32", (-(-out // BLOCK), -(-inp // BLOCK))),
        ]

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        t = quantize(w, item.weight, amax, name=item.name)
        return [(item.name, t["qdata"]), (f"{item.module}.weight_scale_inv", t["scale_inv"])]

    def update_config(self, config, plan, recipe):
        config = dict(config)
        keep = unquantized_linear_modules(plan)
        weight_only = all(i.input is None for i in plan.items.values() if i.quantized)
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            # vLLM requires activation_scheme; weight-only exports still name "dynamic" (no input scales exist)
            # and say so in `weight_only` so the difference is visible.
            "activation_scheme": "dynamic",
            "weight_only": weight_only,
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": keep,
            "ignored_layers": keep,
        }
        return config


register_output_format(NativeFp8Block())
