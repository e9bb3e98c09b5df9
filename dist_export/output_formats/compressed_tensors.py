"""`--format compressed-tensors`: the layout llm-compressor writes and vLLM serves with its own kernels.

Stage and rank: `check_items` and `outputs` run at planning on every rank (metadata only); `produce` runs on the
rank that owns the item, on its device; `update_config` runs on rank 0 at commit.

| llm-compressor scheme | recipes                        | format               | tensors of one Linear `<m>`                        |
| W4A16, W8A16 (INT)    | int4-w4a16(-mse), int8-w8a16   | pack-quantized       | weight_packed I32 [N, ceil(K*bits/32)], weight_scale F64 [N, K/g] / [N, 1] / [1], weight_shape I64 [2] |
| FP8 (static)          | fp8                            | float-quantized      | weight F8_E4M3 [N, K], weight_scale F32 [1] / [N, 1], input_scale F32 [1] |
| FP8_DYNAMIC           | fp8-pc-pt                      | float-quantized      | weight F8_E4M3 [N, K], weight_scale F32 [N, 1]     |
| FP8_BLOCK             | fp8-block                      | float-quantized      | weight F8_E4M3 [N, K], weight_scale F32 [ceil(N/b), ceil(K/b)] |
| NVFP4A16, NVFP4       | nvfp4-w4a16, nvfp4, nvfp4-mse(-wide) | nvfp4-pack-quantized | weight_packed U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_global_scale F32 [1], input_global_scale F32 [1] (NVFP4) |
| W8A8 (INT8, dynamic per-token INT8 inputs) | int8-w8a8 | int-quantized | weight I8 [N, K], weight_scale F64 [N, 1] |
| MXFP8A16              | mxfp8-w8a16                    | mxfp8-quantized      | weight F8_E4M3 [N, K], weight_scale U8 (E8M0) [N, K/32] |
| MXFP4A16              | mxfp4-w4a16                    | mxfp4-pack-quantized | weight_packed U8 [N, K/2], weight_scale U8 (E8M0) [N, K/32] |

Every scale is chosen so that compressed-tensors' own decompression (`dequantize=True` loads) gives exactly the
`vllm-fq` fold of the same recipe in the model dtype (tested against the compressed-tensors package):
- FP8: `weight_scale` is the fold's exact multiplier `inv` (float32), as in the other real formats.
- MX: codes and E8M0 exponents are the fold's (numerics/mx.py); `2 ** (byte - 127)` times a code is exact.
- INT: compressed-tensors multiplies the codes by the scale (in the scale's dtype) where the fold divides by
  `s = maxb / amax`; the stored scale is `1 / s` in float64, whose product with every code rounds to the fold's
  value in any model dtype (checked per group at export; numerics/multipliers.py says why float32 cannot).
- NVFP4: packing, block scales and zero signs are the fold's (numerics/nvfp4.py); compressed-tensors divides the
  block scale by `weight_global_scale`, stored as `1 / gs` or a float32 neighbour chosen the same way. The choice
  depends on the amax alone, so fused q/k/v and gate/up (shared amax) get one global scale. compressed-tensors
  decompresses NVFP4 to bfloat16, so bfloat16 weights only.
Input scales follow compressed-tensors' conventions (FP8 `input_scale = amax / 448`, NVFP4
`input_global_scale = 2688 / amax`) with one value per fused group (q/k/v, gate/up: the max), as vLLM needs.
KV cache (recipe `kv_cache: fp8`): `kv_cache_scheme` FP8 per tensor, `<attention>.k_scale` / `.v_scale` F32 [1]
= calibrated amax of the key / value states after RoPE / 448, written with the layer's k_proj / v_proj.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from ..numerics import expand_to, quantize
from ..numerics.constants import F8E4M3_MAX, NVFP4_GLOBAL_DIVISOR
from ..numerics.integer import BITS, int_range
from ..numerics.multipliers import int_divisor, int_multiplier, nvfp4_global_scale
from ..numerics.mx import MX_BLOCK, quantize_mx
from ..numerics.nvfp4 import encode_e2m1, pack_nibbles
from ..plan import OutSpec
from ..sources.encode import pack_int32
from ..storage.header import ST_TO_DTYPE
from . import OutputFormat, refuse_expert_stacks, register_output_format, unquantized_linear_modules

# The compressed-tensors release whose layout and config schema this writer follows (and is tested against).
CT_LAYOUT_VERSION = "0.20.1"
NVFP4_SCALE_DTYPE = "torch.float8_e4m3fn"


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors scheme: how a quantized Linear of ours is described and stored."""

    preset: str  # llm-compressor's preset name (messages and docs)
    format: str  # compressed-tensors compression format
    weight_args: Callable  # (QuantSpec) -> config "weights" dict
    input_args: Callable  # (InputSpec | None) -> config "input_activations" dict or None
    outputs: Callable  # (Item) -> list[OutSpec]
    produce: Callable  # (Item, w, amax, block_amax, input_amax) -> list[(name, tensor)]
    refuse: Callable = lambda item: None  # (Item) -> reason string, or None when the item can be stored


_SCHEMES: dict[tuple, Scheme] = {}


def scheme_key(item) -> tuple:
    """(weight format, weight granularity, input (format, granularity, dynamic) or None)."""
    w, i = item.weight, item.input
    return w.fmt, w.granularity, None if i is None else (i.fmt, i.granularity, i.dynamic)


def register_scheme(keys, scheme: Scheme) -> None:
    for key in keys:
        if key in _SCHEMES:
            raise ValueError(f"compressed-tensors scheme key {key} registered twice")
        _SCHEMES[key] = scheme


def scheme_for(item) -> Scheme:
    scheme = _SCHEMES.get(scheme_key(item))
    if scheme is None:
        known = sorted({s.preset for s in _SCHEMES.values()})
        raise ValueError(
            f"--format compressed-tensors has no scheme for {item.module} (weight {item.weight.fmt}/"
            f"{item.weight.granularity}, input {item.input}); it stores {known}: use --format vllm-fq or a recipe "
            f"of those schemes"
        )
    return scheme


def _dtype(item) -> torch.dtype:
    return ST_TO_DTYPE[item.meta.dtype]


def _observer(spec) -> str:
    return "mse" if spec.scale_search == "mse" else "minmax"


def _scale_shape(spec, shape) -> tuple[int, ...]:
    """compressed-tensors' weight_scale shape: [1] per tensor, [N, 1] per channel, [N, K/g], [N/b, K/b]."""
    amax_shape = spec.amax_shape(tuple(shape))
    return amax_shape if amax_shape else (1,)


# ---- INT weights, 16-bit activations: pack-quantized ----

def _int_refuse(item) -> str | None:
    spec = item.weight
    if spec.granularity == "group" and item.meta.shape[-1] % spec.block_size:
        return (f"{item.module}: input size {item.meta.shape[-1]} is not a multiple of the group size "
                f"{spec.block_size}, which compressed-tensors requires; use --format vllm-fq")
    return None


def _int_weight_args(spec) -> dict:
    args = {"num_bits": BITS[spec.fmt], "type": "int", "symmetric": True, "strategy": spec.granularity,
            "dynamic": False, "observer": _observer(spec)}
    if spec.granularity == "group":
        args["group_size"] = spec.block_size
    return args


def _int_outputs(item) -> list[OutSpec]:
    n, k = item.meta.shape
    m, bits = item.module, BITS[item.weight.fmt]
    return [OutSpec(f"{m}.weight_packed", "I32", (n, -(-k * bits // 32))),
            OutSpec(f"{m}.weight_scale", "F64", _scale_shape(item.weight, item.meta.shape)),
            OutSpec(f"{m}.weight_shape", "I64", (2,))]


def _int_codes(item, w, amax) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of the fold, float64 weight_scale in compressed-tensors' shape) of one INT weight."""
    spec = item.weight
    maxb, minb = int_range(spec.fmt)
    scale, found = int_multiplier(amax, maxb, minb, _dtype(item))
    if not bool(found.all()):
        bad = int((~found).sum())
        raise ValueError(f"{item.name}: {bad} of {found.numel()} scale groups do not dequantize to the fold "
                         f"exactly in {_dtype(item)}; export it with --format vllm-fq")
    s, zero = int_divisor(amax, maxb)
    x = w.float()
    q = torch.clamp(torch.round(x * expand_to(s, x.shape, spec.granularity, spec.block_size)), minb, maxb)
    q = torch.where(expand_to(zero, x.shape, spec.granularity, spec.block_size), torch.zeros_like(q), q)
    return q.to(torch.int8), scale.reshape(_scale_shape(spec, w.shape)).contiguous()


def _int_produce(item, w, amax, block_amax, input_amax):
    m = item.module
    q, scale = _int_codes(item, w, amax)
    shape = torch.tensor(list(w.shape), dtype=torch.int64, device=w.device)
    return [(f"{m}.weight_packed", pack_int32(q, BITS[item.weight.fmt])), (f"{m}.weight_scale", scale),
            (f"{m}.weight_shape", shape)]


register_scheme(
    [(fmt, gran, None) for fmt in ("int4", "int8") for gran in ("tensor", "channel", "group")],
    Scheme("W4A16/W8A16", "pack-quantized", _int_weight_args, lambda i: None, _int_outputs, _int_produce,
           _int_refuse),
)


# ---- INT8 weights with INT8 dynamic per-token activations: int-quantized (W8A8) ----

def _w8a8_input_args(inp) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _w8a8_outputs(item) -> list[OutSpec]:
    return [OutSpec(item.name, "I8", item.meta.shape),
            OutSpec(f"{item.module}.weight_scale", "F64", _scale_shape(item.weight, item.meta.shape))]


def _w8a8_produce(item, w, amax, block_amax, input_amax):
    q, scale = _int_codes(item, w, amax)
    return [(item.name, q), (f"{item.module}.weight_scale", scale)]


register_scheme([("int8", g, ("int8", "token", True)) for g in ("tensor", "channel")],
                Scheme("W8A8", "int-quantized", _int_weight_args, _w8a8_input_args, _w8a8_outputs, _w8a8_produce))


# ---- MX weights (E8M0 power-of-two scale per 32), 16-bit activations: mxfp8-quantized, mxfp4-pack-quantized ----

BITS_MX = {"mxfp8": 8, "mxfp4": 4}


def _mx_refuse(item) -> str | None:
    if item.meta.shape[-1] % MX_BLOCK:
        return (f"{item.module}: input size {item.meta.shape[-1]} is not a multiple of {MX_BLOCK}, which "
                f"compressed-tensors' MX groups require; use --format vllm-fq")
    return None


def _mx_weight_args(spec) -> dict:
    return {"num_bits": BITS_MX[spec.fmt], "type": "float", "symmetric": True, "strategy": "group",
            "group_size": MX_BLOCK, "dynamic": False, "observer": "minmax", "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8"}


def _mx_outputs(item) -> list[OutSpec]:
    n, k = item.meta.shape
    m = item.module
    codes = (OutSpec(item.name, "F8_E4M3", (n, k)) if item.weight.fmt == "mxfp8"
             else OutSpec(f"{m}.weight_packed", "U8", (n, k // 2)))
    return [codes, OutSpec(f"{m}.weight_scale", "U8", (n, k // MX_BLOCK))]


def _mx_produce(item, w, amax, block_amax, input_amax):
    m, fmt = item.module, item.weight.fmt
    q, k = quantize_mx(w, fmt, amax if amax.dim() else None)
    scale = (k + 127).to(torch.uint8)  # E8M0: biased exponent, compressed-tensors' 2 ** (byte - 127)
    if fmt == "mxfp8":
        return [(item.name, q.to(torch.float8_e4m3fn)), (f"{m}.weight_scale", scale)]
    return [(f"{m}.weight_packed", pack_nibbles(encode_e2m1(q))), (f"{m}.weight_scale", scale)]


register_scheme([("mxfp8", "group", None)],
                Scheme("MXFP8A16", "mxfp8-quantized", _mx_weight_args, lambda i: None, _mx_outputs, _mx_produce,
                       _mx_refuse))
register_scheme([("mxfp4", "group", None)],
                Scheme("MXFP4A16", "mxfp4-pack-quantized", _mx_weight_args, lambda i: None, _mx_outputs,
                       _mx_produce, _mx_refuse))


# ---- FP8 weights (per tensor, per channel, 2-D blocks) with FP8 activations: float-quantized ----

def _fp8_weight_args(spec) -> dict:
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": spec.granularity, "dynamic": False,
            "observer": "minmax"}
    if spec.granularity == "block":
        args["block_structure"] = [spec.block_size, spec.block_size]
    return args


def _fp8_input_args(inp) -> dict:
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": inp.granularity, "dynamic": inp.dynamic}
    if inp.granularity == "group":
        args["group_size"] = inp.block_size
    if not inp.dynamic:
        args["observer"] = "static_minmax"
    return args


def _fp8_outputs(item) -> list[OutSpec]:
    m = item.module
    out = [OutSpec(item.name, "F8_E4M3", item.meta.shape),
           OutSpec(f"{m}.weight_scale", "F32", _scale_shape(item.weight, item.meta.shape))]
    if not item.input.dynamic:
        out.append(OutSpec(f"{m}.input_scale", "F32", (1,)))
    return out


def _fp8_produce(item, w, amax, block_amax, input_amax):
    m = item.module
    t = quantize(w, item.weight, amax, name=item.name)
    out = [(item.name, t["qdata"]), (f"{m}.weight_scale", t["scale_inv"].reshape(_scale_shape(item.weight, w.shape)))]
    if not item.input.dynamic:
        a = input_amax.float().reshape(1).to(w.device)
        out.append((f"{m}.input_scale", a / torch.full_like(a, F8E4M3_MAX)))
    return out


register_scheme([("fp8", g, ("fp8", "tensor", False)) for g in ("tensor", "channel")],
                Scheme("FP8", "float-quantized", _fp8_weight_args, _fp8_input_args, _fp8_outputs, _fp8_produce))
register_scheme([("fp8", g, ("fp8", "token", True)) for g in ("tensor", "channel")],
                Scheme("FP8_DYNAMIC", "float-quantized", _fp8_weight_args, _fp8_input_args, _fp8_outputs,
                       _fp8_produce))
register_scheme([("fp8", "block", ("fp8", "group", True))],
                Scheme("FP8_BLOCK", "float-quantized", _fp8_weight_args, _fp8_input_args, _fp8_outputs,
                       _fp8_produce))


# ---- NVFP4 weights, 16-bit or static NVFP4 activations: nvfp4-pack-quantized ----

def _nvfp4_refuse(item) -> str | None:
    if item.meta.dtype != "BF16":
        return (f"{item.module} is {item.meta.dtype}: compressed-tensors decompresses NVFP4 to bfloat16, which "
                f"equals the fold only for bfloat16 weights; convert the source or use --format vllm-fq")
    if item.meta.shape[-1] % 16:
        return f"{item.module}: input size {item.meta.shape[-1]} is not a multiple of 16; use --format vllm-fq"
    return None


def _nvfp4_args(dynamic) -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
            "dynamic": dynamic, "scale_dtype": NVFP4_SCALE_DTYPE}


def _nvfp4_weight_args(spec) -> dict:
    return {**_nvfp4_args(False), "observer": _observer(spec)}


def _nvfp4_input_args(inp) -> dict | None:
    if inp is None:
        return None
    # Static global scale from calibration, block scales computed at run time ("local" dynamic).
    return {**_nvfp4_args("local"), "observer": "static_minmax"}


def _nvfp4_outputs(item) -> list[OutSpec]:
    n, k = item.meta.shape
    m = item.module
    out = [OutSpec(f"{m}.weight_packed", "U8", (n, k // 2)), OutSpec(f"{m}.weight_scale", "F8_E4M3", (n, k // 16)),
           OutSpec(f"{m}.weight_global_scale", "F32", (1,))]
    if item.input is not None:
        out.append(OutSpec(f"{m}.input_global_scale", "F32", (1,)))
    return out


def _nvfp4_produce(item, w, amax, block_amax, input_amax):
    m = item.module
    t = quantize(w, item.weight, amax, block_amax, name=item.name)
    g, found = nvfp4_global_scale(t["weight_scale_2"], _dtype(item))
    if not found:
        raise ValueError(f"{item.name}: no float32 global scale dequantizes to the NVFP4 fold exactly (amax "
                         f"{float(amax.float().max()):.6g}); export it with --format vllm-fq")
    out = [(f"{m}.weight_packed", t["qdata"]), (f"{m}.weight_scale", t["weight_scale"]),
           (f"{m}.weight_global_scale", g.reshape(1))]
    if item.input is not None:
        a = input_amax.float().reshape(1).to(w.device)
        out.append((f"{m}.input_global_scale", torch.full_like(a, NVFP4_GLOBAL_DIVISOR) / a))
    return out


register_scheme([("nvfp4", "group", None)],
                Scheme("NVFP4A16", "nvfp4-pack-quantized", _nvfp4_weight_args, _nvfp4_input_args, _nvfp4_outputs,
                       _nvfp4_produce, _nvfp4_refuse))
register_scheme([("nvfp4", "group", ("nvfp4", "group", False))],
                Scheme("NVFP4", "nvfp4-pack-quantized", _nvfp4_weight_args, _nvfp4_input_args, _nvfp4_outputs,
                       _nvfp4_produce, _nvfp4_refuse))


# ---- the config ----

def kv_cache_scheme(plan, recipe) -> dict | None:
    """compressed-tensors' `kv_cache_scheme` (QuantizationArgs of the K/V states): FP8 E4M3, one static symmetric
    scale per attention layer (`<attention>.k_scale` / `.v_scale` = amax / 448); None without recipe.kv_cache."""
    if recipe.kv_cache is None:
        return None
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
            "dynamic": False, "observer": "minmax"}


def _kv_scale_name(item) -> str:
    """`<attention>.k_scale` / `.v_scale`: where llm-compressor puts them and vLLM's default mapping reads them."""
    attention, quantizer = item.kv.rsplit(".", 1)
    return f"{attention}.{quantizer[0]}_scale"


def config_groups(plan) -> dict:
    """One config group per distinct scheme. A single group targets every `Linear` (what llm-compressor writes;
    every unquantized Linear is in `ignore`); with several, each group names its modules exactly."""
    groups: dict[str, dict] = {}
    for item in plan.items.values():
        if not item.quantized:
            continue
        scheme = scheme_for(item)
        entry = {"format": scheme.format, "weights": scheme.weight_args(item.weight),
                 "input_activations": scheme.input_args(item.input), "output_activations": None}
        key = json.dumps(entry, sort_keys=True)
        groups.setdefault(key, {**entry, "targets": []})["targets"].append(item.module)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = ["Linear"]
    return {f"group_{i}": g for i, g in enumerate(groups.values())}


class CompressedTensors(OutputFormat):
    name = "compressed-tensors"
    carries_kv_cache = True

    def kv_outputs(self, item):
        # float32 (llm-compressor writes the model dtype; vLLM and compressed-tensors read either): the scale
        # stays amax / 448 exactly, so the largest calibrated K/V value maps to 448, not past it
        return [OutSpec(_kv_scale_name(item), "F32", (1,))]

    def kv_tensors(self, item, kv_amax):
        return [(_kv_scale_name(item), (kv_amax / F8E4M3_MAX).reshape(1))]

    def load_hint(self, out_dir: str) -> str:
        return (f"vllm serve {out_dir} (or transformers with the compressed-tensors package)")

    def check_items(self, items, recipe):
        refuse_expert_stacks(items, self.name)
        for item in items:
            if item.quantized:
                reason = scheme_for(item).refuse(item)
                if reason:
                    raise ValueError(f"--format compressed-tensors: {reason}")

    def outputs(self, item):
        if not item.quantized:
            return super().outputs(item)
        return scheme_for(item).outputs(item)

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        return scheme_for(item).produce(item, w, amax, block_amax, input_amax)

    def update_config(self, config, plan, recipe):
        groups = config_groups(plan)
        formats = sorted({g["format"] for g in groups.values()})
        config = dict(config)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "version": CT_LAYOUT_VERSION,
            "format": formats[0] if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": unquantized_linear_modules(plan),
            "kv_cache_scheme": kv_cache_scheme(plan, recipe),
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }
        return config


register_output_format(CompressedTensors())
