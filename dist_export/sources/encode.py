"""Encoders for synthetic already-quantized sources (`make-model --source-format`; runs in the one make-model
process): a bf16 weight to the stored tensors of FP8-block, gpt-oss MXFP4 or compressed-tensors W8A16
checkpoints, and the `quantization_config` such a checkpoint carries.

These write what the real tools write (tests/test_sources.py reads the results back with transformers' and
compressed-tensors' own dequantization); exact choices made here (how scales round) only need to give a valid
checkpoint, the reader does not depend on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..numerics import QuantSpec, quantize, reduce_abs_max
from .dequant import MX_BLOCK, E8M0_BIAS

FP8_BLOCK = 128


def encode_fp8_block(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"weight": float8_e4m3fn, "weight_scale_inv": float32 [ceil(out/128), ceil(in/128)]} (amax / 448 per
    block, the layout DeepSeek's and our own fp8-block exports write)."""
    spec = QuantSpec("fp8", "block", FP8_BLOCK)
    t = quantize(w, spec, reduce_abs_max(w, "block", FP8_BLOCK))
    return {"weight": t["qdata"], "weight_scale_inv": t["scale_inv"]}


def encode_gpt_oss_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A gpt-oss expert stack `[E, in, out]` to `{"_blocks": U8 [E, out, in/32, 16], "_scales": U8 [E, out, in/32]}`.

    Scale per 32 inputs: the e8m0 power of two `2 ** ceil(log2(amax / 6))` (no value clips); codes: nearest
    E2M1 value of `x / scale`, low nibble = even element.
    """
    x = w.float().transpose(-1, -2)  # [E, out, in]
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"MXFP4 needs an input dim divisible by {MX_BLOCK}, got {list(w.shape)}")
    x = x.unflatten(-1, (x.shape[-1] // MX_BLOCK, MX_BLOCK))
    amax = x.abs().amax(-1)
    exp = torch.ceil(torch.log2(torch.clamp(amax, min=2.0**-120) / 6.0)).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = x / torch.exp2(exp)[..., None]
    grid = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
    idx = (scaled.abs()[..., None] - grid).abs().argmin(-1).to(torch.uint8)
    codes = idx | ((scaled < 0).to(torch.uint8) << 3)
    pairs = codes.unflatten(-1, (MX_BLOCK // 2, 2))
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return {"_blocks": blocks.contiguous(), "_scales": (exp + E8M0_BIAS).to(torch.uint8).contiguous()}


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """compressed-tensors `pack-quantized` words (num_bits 4 or 8): value + 2 ** (b - 1), element k of a row at
    bits [k * b, k * b + b) of the little-endian word stream, rows zero-padded to whole words."""
    u = (q.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    per_word = 32 // num_bits
    pad = (-u.shape[-1]) % per_word
    if pad:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], pad)], dim=-1)
    if num_bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u.contiguous().view(torch.int32)


def encode_ct_w8a16(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """llm-compressor's W8A16 preset as compressed-tensors stores it: int8 symmetric per output channel,
    `pack-quantized` ({"weight_packed": I32, "weight_scale": bf16 [out, 1], "weight_shape": I64 [2]})."""
    scale = (w.float().abs().amax(dim=-1, keepdim=True) / 127.0).to(w.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w.float() / scale.float()), -128, 127).to(torch.int8)
    return {"weight_packed": pack_int32(q, 8), "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


# ------------------------------------------------------------------------------------- source formats


@dataclass(frozen=True)
class SourceFormat:
    """A synthetic source layout: which tensors it stores quantized (`selects(name, shape)`), how (`encode`
    returns {stored-name suffix: tensor}, replacing the weight's own suffix `strip`), the stored layout from
    metadata alone (`layout(shape, dtype)`: [(suffix, safetensors dtype, shape)], in `encode` order), and the
    `quantization_config` (given the 2-D weights it left unquantized)."""

    name: str
    selects: Callable[[str, tuple[int, ...]], bool]
    strip: str
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    layout: Callable[[tuple[int, ...], str], list[tuple[str, str, tuple[int, ...]]]]
    config: Callable[[list[str]], dict]

    def _base(self, name: str) -> str:
        return name[: -len(self.strip)] if self.strip else name

    def stored(self, name: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(self._base(name) + suffix, t) for suffix, t in self.encode(w).items()]

    def stored_layout(self, name: str, shape: tuple[int, ...], dtype: str) -> list[tuple[str, str, tuple]]:
        return [(self._base(name) + suffix, st, s) for suffix, st, s in self.layout(tuple(shape), dtype)]


_NOT_LINEAR = re.compile(r"(embed|lm_head|norm|\.mlp\.gate\.|router)")


def _is_linear(name: str, shape) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and not _NOT_LINEAR.search(name)


def _fp8_config(skipped):
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def _mxfp4_config(skipped):
    return {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}


def _ct_config(skipped):
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": sorted(skipped), "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


def _fp8_layout(shape, dtype):
    return [("", "F8_E4M3", shape), ("_scale_inv", "F32", (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK)))]


def _mxfp4_layout(shape, dtype):
    e, n_in, n_out = shape
    return [("_blocks", "U8", (e, n_out, n_in // MX_BLOCK, MX_BLOCK // 2)), ("_scales", "U8", (e, n_out, n_in // MX_BLOCK))]


def _ct_layout(shape, dtype):
    return [("weight_packed", "I32", (shape[0], -(-shape[1] // 4))), ("weight_scale", dtype, (shape[0], 1)),
            ("weight_shape", "I64", (2,))]


def _fp8_encode(w):
    e = encode_fp8_block(w)
    return {"": e["weight"], "_scale_inv": e["weight_scale_inv"]}


def _is_gpt_oss_stack(name: str, shape) -> bool:
    return re.search(r"\.experts\.(gate_up_proj|down_proj)$", name) is not None and len(shape) == 3


SOURCE_FORMATS = {
    "fp8-block": SourceFormat("fp8-block", _is_linear, "", _fp8_encode, _fp8_layout, _fp8_config),
    "mxfp4": SourceFormat("mxfp4", _is_gpt_oss_stack, "", encode_gpt_oss_mxfp4, _mxfp4_layout, _mxfp4_config),
    "compressed-tensors": SourceFormat("compressed-tensors", _is_linear, "weight", encode_ct_w8a16, _ct_layout,
                                       _ct_config),
}
