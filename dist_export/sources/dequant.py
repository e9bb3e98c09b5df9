"""Dequantization of already-quantized source weights (execute stage, every rank, on the rank's device).

Pure tensor functions, one per stored layout, each registered as a `Codec` that carries its own facts (which
stored tensors it reads). The arithmetic is the one transformers and vLLM use to load these checkpoints, so a
source read through here gives the same bf16 values, bit for bit, as transformers' own dequantized copy
(docs/sources.md states each formula; tests/test_sources.py checks them against transformers and
compressed-tensors):

- FP8 blocks (`quant_method: fp8`): `y = dtype(float32(q) * float32(s[i // bm, j // bn]))`; the scale grid is
  `[ceil(rows / bm), ceil(cols / bn)]`, the last block of a dimension that the block does not divide is partial.
- MXFP4 (gpt-oss): E2M1 code pairs, low nibble first, times `2 ** (e8m0 - 127)` per 32 values: exact in float32.
- compressed-tensors integers/floats: `y = dtype((sdt(q) - sdt(zp)) * s)` in the scale's dtype `sdt`, as
  compressed-tensors' `dequantize` computes it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

# E2M1 magnitudes by code (bit 3 is the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127  # e8m0 byte e means 2 ** (e - 127); 255 is NaN (decoded as inf, as transformers does)
MX_BLOCK = 32  # values per MXFP4 scale


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_fp8_block(qdata: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """`[..., rows, cols]` FP8 codes times their block's multiplier, float32 math, one RNE cast to `dtype`.

    `scale_inv` is `[..., ceil(rows / bm), ceil(cols / bn)]` (float32, bfloat16, or e8m0 bytes); element (i, j)
    uses `scale_inv[i // bm, j // bn]`, so partial last blocks need no padding.
    """
    rows, cols = qdata.shape[-2:]
    bm, bn = block
    grid = (cdiv(rows, bm), cdiv(cols, bn))
    if tuple(scale_inv.shape[-2:]) != grid or scale_inv.shape[:-2] != qdata.shape[:-2]:
        raise ValueError(f"FP8 weight {list(qdata.shape)} with blocks {bm}x{bn} needs a scale grid "
                         f"{[*qdata.shape[:-2], *grid]}, got {list(scale_inv.shape)}")
    s = _scale_float(scale_inv).repeat_interleave(bm, dim=-2)[..., :rows, :]  # [..., rows, ceil(cols / bn)]
    x = qdata.float()
    full = cols // bn
    x[..., : full * bn].unflatten(-1, (full, bn)).mul_(s[..., :full, None])
    if cols % bn:
        x[..., full * bn:].mul_(s[..., full:])
    return x.to(dtype)


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # e8m0 exponents
        return e8m0_to_float(scale)
    return scale.float()


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 `2 ** (e - 127)`: the byte is the float32 exponent field (e = 0 is the subnormal 2**-127,
    e = 255 gives inf)."""
    bits = e.to(torch.int32) << 23
    return torch.where(e == 0, torch.full_like(bits, 1 << 22), bits).view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 `blocks [..., G, 16]` (two E2M1 codes per byte, low nibble = even element) and `scales [..., G]`
    (e8m0) to `[..., G * 32]`: `y = dtype(E2M1[code] * 2 ** (scale - 127))`, exact in float32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} need scales {list(blocks.shape[:-1])} and a last "
                         f"dim of {MX_BLOCK // 2}, got scales {list(scales.shape)}")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values.mul_(e8m0_to_float(scales)[..., None])
    return values.flatten(-2).to(dtype)


def dequantize_gpt_oss_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss experts: stored `[E, out, in / 32, 16]`, used (and saved in bf16 checkpoints) as `[E, in, out]`."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(-1, -2).contiguous()


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """compressed-tensors `pack-quantized` words to signed integers `[..., cols]` (int16).

    Element k of a row sits at bits `[k * b, k * b + b)` of the row's little-endian word stream, stored as
    `q + 2 ** (b - 1)`; for b = 4 and 8 no element crosses a byte (the layouts older and newer
    compressed-tensors agree on, the only ones read here).
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"pack-quantized weights are int32 words, got {packed.dtype}")
    if sys.byteorder != "little" and packed.device.type == "cpu":
        raise ValueError("pack-quantized weights are read on little-endian hosts only")
    u8 = packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        values = u8
    elif num_bits == 4:
        values = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).flatten(-2)
    else:
        raise ValueError(f"pack-quantized with num_bits={num_bits} is not supported; supported: 4, 8")
    if values.shape[-1] < cols:
        raise ValueError(f"pack-quantized row holds {values.shape[-1]} values, weight_shape says {cols}")
    return values[..., :cols].to(torch.int16) - (1 << (num_bits - 1))


def unpack_int32_rows(packed: torch.Tensor, num_bits: int, rows: int) -> torch.Tensor:
    """A zero point packed along dim 0 (compressed-tensors packs `weight_zero_point` by rows)."""
    return unpack_int32(packed.transpose(-1, -2), num_bits, rows).transpose(-1, -2)


def expand_scale(scale: torch.Tensor, shape: torch.Size, strategy: str, group_size: int | None,
                 block: tuple[int, int] | None) -> torch.Tensor:
    """A per-tensor/channel/group/block scale (or zero point) broadcast to element `shape` (a view where it
    can be; partial last groups and blocks cropped)."""
    rows, cols = shape[-2:]
    expected = {
        "tensor": None,
        "channel": (rows, 1),
        "group": (rows, cdiv(cols, group_size or 1)),
        "block": (cdiv(rows, block[0]), cdiv(cols, block[1])) if block else None,
    }
    if strategy not in expected:
        raise ValueError(f"compressed-tensors strategy {strategy!r} is not supported; supported: "
                         f"{sorted(expected)}")
    want = expected[strategy]
    if strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"per-tensor scale must have one element, got {list(scale.shape)}")
        return scale.reshape(()).expand(shape)
    if tuple(scale.shape[-2:]) != want:
        raise ValueError(f"{strategy} scale for a {list(shape)} weight must be {list(want)}, got {list(scale.shape)}")
    if strategy == "channel":
        return scale.expand(shape)
    if strategy == "group":
        return scale.repeat_interleave(group_size, dim=-1)[..., :cols]
    return scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :rows, :cols]


def dequantize_ct(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, strategy: str,
                  group_size: int | None, block: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' dequantization: `(sdt(q) - sdt(zp)) * s` in the scale's dtype `sdt`, then `dtype`."""
    sdt = scale.dtype
    x = q.to(sdt)
    if zero_point is not None:
        x = x - expand_scale(zero_point, q.shape, strategy, group_size, block).to(sdt)
    x = x * expand_scale(scale, q.shape, strategy, group_size, block)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Codec:
    """How one stored layout decodes: the roles of the stored tensors it may read, and
    `decode(parts, args, shape, dtype)` (pure; runs on the parts' device; `shape` is the decoded shape, known from
    metadata at plan time, so decoding never waits on the device to learn it).
    """

    name: str
    roles: tuple[str, ...]
    decode: Callable[[dict[str, torch.Tensor], dict, tuple[int, ...], torch.dtype], torch.Tensor]


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in _CODECS:
        raise ValueError(f"source codec {codec.name!r} registered twice")
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    return _CODECS[name]


def _decode_fp8_block(parts, args, shape, dtype):
    return dequantize_fp8_block(parts["qdata"], parts["scale_inv"], tuple(args["block"]), dtype)


def _decode_mxfp4(parts, args, shape, dtype):
    return dequantize_gpt_oss_mxfp4(parts["blocks"], parts["scales"], dtype)


def _decode_ct(parts, args, shape, dtype):
    q = parts.get("qdata")
    if "packed" in parts:
        q = unpack_int32(parts["packed"], args["num_bits"], shape[-1])
        if tuple(q.shape) != tuple(shape):
            raise ValueError(f"pack-quantized words unpack to {list(q.shape)}, weight_shape says {list(shape)}")
    zp = parts.get("zero_point")
    if zp is not None and args.get("packed_zero_point"):
        zp = unpack_int32_rows(zp, args["num_bits"], q.shape[-2])
    return dequantize_ct(q, parts["scale"], zp, args["strategy"], args.get("group_size"), args.get("block"), dtype)


register_codec(Codec("fp8-block", ("qdata", "scale_inv"), _decode_fp8_block))
register_codec(Codec("gpt-oss-mxfp4", ("blocks", "scales"), _decode_mxfp4))
register_codec(Codec("compressed-tensors", ("qdata", "packed", "scale", "zero_point"), _decode_ct))


def decoded_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
