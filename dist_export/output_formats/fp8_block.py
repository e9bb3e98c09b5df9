"""`--format fp8-block`: the native `quant_method: "fp8"` layout (DeepSeek/Qwen FP8), formats.md section 3.

Per quantized Linear: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` float32 [ceil(out/128),
ceil(in/128)] holding the dequant multiplier (the exact `inv` of the fold, so codes * scale_inv reproduces the
fake-quant fold bit for bit). Weight-only and dynamic-activation recipes write the same tensors.

Every rank at plan and execute time; rank 0 at commit (config).
"""
from __future__ import annotations

import re

from ..numerics import quantize
from ..plan import OutSpec
from . import OutputFormat, positive_finite, refuse_expert_stacks, register_output_format, unquantized_linear_modules

BLOCK = 128
TP_CANDIDATES = (1, 2, 4, 8, 16)
ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj|w2|out_proj)$")


class NativeFp8Block(OutputFormat):
    name = "fp8-block"

    def load_hint(self, out_dir: str) -> str:
        return (f"vllm serve {out_dir} (or transformers AutoModelForCausalLM.from_pretrained, quant_method fp8)")

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
            return [f"{len(ragged)} quantized weights have a dimension that is not a multiple of {BLOCK} (e.g. "
                    f"{', '.join(ragged[:3])}); they are written with a ceil scale grid, which vLLM reads, but "
                    f"transformers dequantizes such tensors incorrectly"]
        return []

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

    def check_folder(self, out_dir, metas, config, rep):
        """`quant_method: fp8`: every `weight_scale_inv` is F32 on the ceil block grid of an F8_E4M3 weight, finite
        and positive; `rep.extra["vllm_tp_sizes"]`: the tensor-parallel sizes at which every partition of every
        quantized weight is a whole number of blocks (vLLM's condition)."""
        qc = config.get("quantization_config") or {}
        if qc.get("quant_method") != "fp8":
            return
        b0, b1 = qc.get("weight_block_size", [BLOCK, BLOCK])
        tp_ok = set(TP_CANDIDATES)
        ragged = []
        for name, m in metas.items():
            if not name.endswith(".weight_scale_inv"):
                continue
            module = name[: -len(".weight_scale_inv")]
            w = metas.get(module + ".weight")
            if w is None or w.dtype != "F8_E4M3":
                rep.defect(f"{name}: no float8_e4m3fn weight next to it")
                continue
            out, inp = w.shape
            want = (-(-out // b0), -(-inp // b1))
            if m.dtype != "F32" or m.shape != want:
                rep.defect(f"{name}: {m.dtype}{list(m.shape)}, expected F32{list(want)}")
            positive_finite(out_dir, m, rep)
            dim, block = (inp, b1) if ROW_PARALLEL.search(module) else (out, b0)
            tp_ok &= {tp for tp in TP_CANDIDATES if dim % tp == 0 and (dim // tp) % block == 0}
            if out % b0 or inp % b1:
                ragged.append(f"{module} {[out, inp]}")
        if ragged:
            rep.warnings.append(f"{len(ragged)} quantized weights are not multiples of {b0}x{b1} (e.g. "
                                f"{', '.join(ragged[:3])}): transformers dequantizes them incorrectly; vLLM reads "
                                f"the ceil grid")
        rep.extra["vllm_tp_sizes"] = sorted(tp_ok)


register_output_format(NativeFp8Block())
