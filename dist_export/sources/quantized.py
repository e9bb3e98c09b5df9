"""Already-quantized sources (plan stage on every rank: metadata only): which stored tensors make up each weight.

A checkpoint whose `config.json` has a `quantization_config` stores some weights as codes plus scales. Here the
stored tensors are mapped to the weights they encode: every quantized weight becomes one `EncodedMeta` (the
decoded name, dtype and shape, and the stored parts it is read from), the source's scale tensors are consumed
(never copied) and everything else passes through unchanged. Each source quantization is a registered
`SourceQuantization` keyed by its `quant_method`; an unknown method, or a stored tensor that still looks
quantized after the mapping, is an error naming it, so quantized bytes never pass through as weights.

Decoding itself runs in the execute stage on the rank's device (`dequant.py`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..storage.header import ST_TO_DTYPE, TensorMeta
from .dequant import MX_BLOCK, cdiv, get_codec

# stored dtypes that are never weights in their own right
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "U8", "I8", "I32", "F8_E8M0")
# stored-name suffixes of quantization data (scales, codes, packing facts)
QUANTIZED_SUFFIXES = ("weight_scale_inv", "weight_scale", "weight_packed", "weight_zero_point", "weight_shape",
                      "weight_g_idx", "weight_global_scale", "input_scale", "input_global_scale", "_blocks",
                      "_scales", "activation_scale")
DECODED_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
PART_ALIGN = 64  # byte alignment of each stored part inside one read buffer


@dataclass(frozen=True)
class EncodedMeta:
    """A weight the source stores quantized: the tensor it decodes to, and the stored tensors it is read from.

    Quacks like `TensorMeta` where the planner looks (name, dtype, shape, numel); `nbytes` is the size of the
    buffer its parts are read into (each part at a `PART_ALIGN` offset).
    """

    name: str
    dtype: str  # decoded safetensors dtype (the model's dtype)
    shape: tuple[int, ...]
    codec: str
    args: tuple  # the codec's arguments as sorted (key, value) pairs (hashable)
    parts: tuple[tuple[str, TensorMeta], ...]  # (role, stored tensor)

    @property
    def nbytes(self) -> int:
        return sum(aligned(m.nbytes) for _, m in self.parts)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_DTYPE[self.dtype]

    @property
    def file(self) -> str:
        return self.parts[0][1].file

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoded weight, on the parts' device."""
        return get_codec(self.codec).decode(parts, dict(self.args), self.shape, self.torch_dtype)


class EncodedTensor:
    """The stored parts of one encoded weight, as read (host memory, possibly views into a reused buffer).

    `.to(device)` moves the parts and decodes there, so callers that upload a plain tensor with `.to(device)`
    get the decoded weight on the rank's device without knowing the source was quantized.
    """

    __slots__ = ("meta", "parts")

    def __init__(self, meta: EncodedMeta, parts: dict[str, torch.Tensor]):
        self.meta, self.parts = meta, parts

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        moved = {role: t.to(device, non_blocking=non_blocking) for role, t in self.parts.items()}
        return self.meta.decode(moved)


@dataclass(frozen=True)
class Mapping:
    """The source seen as weights: `tensors` (stored or encoded metas by decoded name) and `consumed` (stored
    names read into encoded weights or dropped: scales, packing facts, activation scales)."""

    tensors: dict
    consumed: tuple[str, ...]
    method: str | None


@dataclass(frozen=True)
class SourceQuantization:
    """One registered source quantization: `map(qcfg, stored, dtype, read_small)` returns the encoded weights
    {decoded name: EncodedMeta} and the stored names it dropped."""

    method: str
    what: str
    map: Callable[[dict, dict[str, TensorMeta], str, Callable], tuple[dict[str, EncodedMeta], list[str]]]


_SOURCES: dict[str, SourceQuantization] = {}


def register_source_quantization(sq: SourceQuantization) -> SourceQuantization:
    if sq.method in _SOURCES:
        raise ValueError(f"source quantization {sq.method!r} registered twice")
    _SOURCES[sq.method] = sq
    return sq


def supported_methods() -> list[str]:
    return sorted(_SOURCES)


def decoded_dtype(config: dict) -> str:
    """The model's dtype, which decoded weights take (bfloat16 when the config names none)."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return DECODED_DTYPES.get(str(name).replace("torch.", ""), "BF16")


def map_source(config: dict, stored: dict[str, TensorMeta], read_small: Callable[[TensorMeta], torch.Tensor]
               ) -> Mapping:
    """Map a checkpoint's stored tensors to the weights they hold (see module docstring)."""
    qcfg = config.get("quantization_config")
    if not qcfg:
        _refuse_quantized_leftovers(stored, None)
        return Mapping(dict(stored), (), None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    sq = _SOURCES.get(method)
    if sq is None:
        raise ValueError(f"the source's quantization_config has quant_method {method!r}, which dist_export cannot "
                         f"read; supported: {supported_methods()}: dequantize the checkpoint to bf16 first")
    encoded, dropped = sq.map(qcfg, stored, decoded_dtype(config), read_small)
    consumed = {m.name for e in encoded.values() for _, m in e.parts} | set(dropped)
    rest = {n: m for n, m in stored.items() if n not in consumed}
    clash = sorted(set(rest) & set(encoded))
    if clash:
        raise ValueError(f"{clash[0]!r} is stored both plain and quantized in the source; remove one copy")
    _refuse_quantized_leftovers(rest, method)
    return Mapping({**rest, **encoded}, tuple(sorted(consumed)), method)


def _refuse_quantized_leftovers(rest: dict[str, TensorMeta], method: str | None) -> None:
    for name in sorted(rest):
        meta = rest[name]
        if meta.dtype in QUANTIZED_DTYPES or name.endswith(QUANTIZED_SUFFIXES):
            how = ("config.json has no quantization_config" if method is None
                   else f"the {method!r} source reader found no weight it belongs to")
            raise ValueError(f"source tensor {name!r} (dtype {meta.dtype} {list(meta.shape)}) holds quantized data but "
                             f"{how}; refusing to pass quantized bytes through as a weight: fix the checkpoint's "
                             f"quantization_config or convert the source to bf16 first")


def aligned(nbytes: int) -> int:
    return -(-nbytes // PART_ALIGN) * PART_ALIGN


def _args(**kw) -> tuple:
    return tuple(sorted((k, v) for k, v in kw.items() if v is not None))


def _require(stored: dict[str, TensorMeta], name: str, dtypes: tuple[str, ...], what: str) -> TensorMeta:
    meta = stored.get(name)
    if meta is None:
        raise ValueError(f"{what}: the source has no tensor {name!r}; the checkpoint is incomplete")
    if meta.dtype not in dtypes:
        raise ValueError(f"{what}: {name!r} is {meta.dtype}, expected one of {list(dtypes)}")
    return meta


# ------------------------------------------------------------------------------------- fp8 (DeepSeek, Qwen)


def _map_fp8(qcfg: dict, stored, dtype: str, read_small):
    block = qcfg.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quant_method 'fp8' with weight_block_size={block!r} is not supported; only block FP8 "
                         f"(weight_block_size [m, n], e.g. [128, 128]) is read")
    if qcfg.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quant_method 'fp8' with fmt={qcfg.get('fmt')!r} is not supported; supported: 'e4m3'")
    encoded, dropped = {}, []
    for name, meta in stored.items():
        if name.endswith(".weight_scale_inv"):
            wname = name[: -len("_scale_inv")]
            w = _require(stored, wname, ("F8_E4M3",), f"FP8 scale {name!r}")
            if meta.dtype not in ("F32", "BF16", "U8"):
                raise ValueError(f"FP8 scale {name!r} is {meta.dtype}; supported: F32, BF16, U8 (e8m0)")
            grid = (*w.shape[:-2], cdiv(w.shape[-2], block[0]), cdiv(w.shape[-1], block[1]))
            if len(w.shape) < 2 or tuple(meta.shape) != grid:
                raise ValueError(f"FP8 weight {wname!r} {list(w.shape)} with blocks {block} needs a scale grid "
                                 f"{list(grid)}, but {name!r} is {list(meta.shape)}: the checkpoint is corrupt")
            encoded[wname] = EncodedMeta(wname, dtype, w.shape, "fp8-block", _args(block=tuple(block)),
                                         (("qdata", w), ("scale_inv", meta)))
        elif name.endswith((".input_scale", ".activation_scale")):
            dropped.append(name)  # static activation scales of the source: the new recipe has its own
    for name, meta in stored.items():
        if meta.dtype == "F8_E4M3" and name not in encoded:
            raise ValueError(f"FP8 weight {name!r} has no {name}_scale_inv beside it; the checkpoint is incomplete")
    return encoded, dropped


register_source_quantization(SourceQuantization("fp8", "128x128 block FP8 (DeepSeek-V3/R1, Qwen3-FP8, Kimi-K2)",
                                                _map_fp8))


# ------------------------------------------------------------------------------------------ mxfp4 (gpt-oss)

_GPT_OSS_STACK = re.compile(r"\.experts\.(gate_up_proj|down_proj)_blocks$")


def _map_mxfp4(qcfg: dict, stored, dtype: str, read_small):
    encoded = {}
    for name, meta in stored.items():
        if not name.endswith("_blocks"):
            continue
        if not _GPT_OSS_STACK.search(name) or len(meta.shape) != 4:
            raise ValueError(f"MXFP4 tensor {name!r} {list(meta.shape)} is not a gpt-oss expert stack "
                             f"[E, out, in/32, 16]; other MXFP4 layouts are not supported")
        wname = name[: -len("_blocks")]
        scales = _require(stored, wname + "_scales", ("U8",), f"MXFP4 blocks {name!r}")
        if meta.dtype != "U8" or tuple(scales.shape) != tuple(meta.shape[:-1]) or meta.shape[-1] != MX_BLOCK // 2:
            raise ValueError(f"MXFP4 blocks {name!r} ({meta.dtype} {list(meta.shape)}) and scales "
                             f"{list(scales.shape)} do not fit: expected U8 [E, out, in/32, 16] and [E, out, in/32]")
        e, out, groups, _ = meta.shape
        encoded[wname] = EncodedMeta(wname, dtype, (e, groups * MX_BLOCK, out), "gpt-oss-mxfp4", (),
                                     (("blocks", meta), ("scales", scales)))
    return encoded, []


register_source_quantization(SourceQuantization("mxfp4", "MXFP4 expert stacks (gpt-oss)", _map_mxfp4))


# ---------------------------------------------------------------------------------------- compressed-tensors

CT_FORMATS = {  # format -> (weight type, stored weight dtypes, packed)
    "pack-quantized": ("int", ("I32",), True),
    "int-quantized": ("int", ("I8",), False),
    "naive-quantized": (None, ("I8", "F8_E4M3"), False),
    "float-quantized": ("float", ("F8_E4M3",), False),
}
_CT_DROPPED = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale", "v_scale")


def _map_compressed_tensors(qcfg: dict, stored, dtype: str, read_small):
    for key in ("sparsity_config", "transform_config"):
        if qcfg.get(key):
            raise ValueError(f"compressed-tensors source with a {key} is not supported (its weights are not the "
                             f"model's weights without it); decompress it with compressed-tensors first")
    groups = qcfg.get("config_groups") or {}
    modules = sorted({n.rsplit(".", 1)[0] for n in stored
                      if n.endswith((".weight_packed", ".weight_scale"))})
    encoded, dropped = {}, []
    for module in modules:
        gname, group = _ct_group(module, groups)
        fmt = group.get("format") or qcfg.get("format")
        wargs = group.get("weights") or {}
        encoded[module + ".weight"], extra = _ct_weight(module, fmt, wargs, stored, dtype, read_small, gname)
        dropped += extra
    dropped += [n for n in stored if n.rsplit(".", 1)[-1] in _CT_DROPPED]
    return encoded, dropped


def _ct_group(module: str, groups: dict) -> tuple[str, dict]:
    """The config group whose targets name this module (`re:` regex, exact name, or a class name such as
    Linear, which matches any module stored quantized)."""
    def matches(target: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], module) is not None
        return target == module or ("." not in target and target[:1].isupper())

    hits = [(g, cfg) for g, cfg in sorted(groups.items()) if any(matches(t) for t in cfg.get("targets", []))]
    if len(hits) != 1:
        raise ValueError(f"compressed-tensors module {module!r} is stored quantized but matches "
                         f"{[g for g, _ in hits] or 'no'} config groups; exactly one must target it")
    return hits[0]


def _ct_weight(module, fmt, w, stored, dtype, read_small, gname):
    if fmt not in CT_FORMATS:
        raise ValueError(f"compressed-tensors format {fmt!r} (config group {gname!r}, module {module!r}) is not "
                         f"supported; supported: {sorted(CT_FORMATS)}")
    want_type, qdtypes, packed = CT_FORMATS[fmt]
    wtype, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if (want_type and wtype != want_type) or (wtype == "float" and bits != 8) or (packed and bits not in (4, 8)):
        raise ValueError(f"compressed-tensors {fmt} with {wtype} {bits}-bit weights ({module!r}) is not supported")
    for name in (f"{module}.weight_g_idx", f"{module}.weight_global_scale"):
        if name in stored:
            raise ValueError(f"compressed-tensors tensor {name!r} (activation ordering or a global scale) is not "
                             f"supported; decompress the checkpoint with compressed-tensors first")
    what = f"compressed-tensors {fmt} module {module!r}"
    scale = _require(stored, f"{module}.weight_scale", ("BF16", "F16", "F32"), what)
    dropped = []
    if packed:
        q = _require(stored, f"{module}.weight_packed", qdtypes, what)
        shape_meta = _require(stored, f"{module}.weight_shape", ("I64", "I32"), what)
        shape = tuple(int(v) for v in read_small(shape_meta).tolist())
        dropped.append(shape_meta.name)
        if len(shape) != 2 or shape[0] != q.shape[0] or cdiv(shape[1] * bits, 32) != q.shape[1]:
            raise ValueError(f"{what}: weight_shape {list(shape)} does not fit weight_packed {list(q.shape)}")
        parts = [("packed", q)]
    else:
        q = _require(stored, f"{module}.weight", qdtypes, what)
        shape = tuple(q.shape)
        parts = [("qdata", q)]
    parts.append(("scale", scale))
    symmetric = w.get("symmetric", True)
    packed_zp = packed and not symmetric and strategy in ("group", "channel")
    if not symmetric:
        parts.append(("zero_point", _require(stored, f"{module}.weight_zero_point",
                                             ("I32",) if packed_zp else ("I8", "BF16", "F16", "F32"), what)))
    block = tuple(w["block_structure"]) if w.get("block_structure") else None
    args = _args(num_bits=bits, strategy=strategy, group_size=w.get("group_size"), block=block,
                 packed_zero_point=packed_zp or None)
    meta = EncodedMeta(f"{module}.weight", dtype, shape, "compressed-tensors", args, tuple(parts))
    _check_ct_scale(meta, scale, strategy, w.get("group_size"), block, what)
    return meta, dropped


def _check_ct_scale(meta: EncodedMeta, scale: TensorMeta, strategy, group_size, block, what) -> None:
    rows, cols = meta.shape
    want = {"tensor": None, "channel": (rows, 1), "group": (rows, cdiv(cols, group_size or 1)),
            "block": (cdiv(rows, block[0]), cdiv(cols, block[1])) if block else None}
    if strategy not in want or (strategy == "block" and block is None):
        raise ValueError(f"{what}: strategy {strategy!r} is not supported; supported: tensor, channel, group, block")
    if strategy == "tensor" and math.prod(scale.shape) != 1:
        raise ValueError(f"{what}: per-tensor weight_scale must hold one value, got {list(scale.shape)}")
    if strategy != "tensor" and tuple(scale.shape) != want[strategy]:
        raise ValueError(f"{what}: {strategy} weight_scale must be {list(want[strategy])}, got {list(scale.shape)}")
    if strategy == "group" and cols % group_size:
        raise ValueError(f"{what}: {cols} columns are not a multiple of group_size {group_size}")


register_source_quantization(SourceQuantization("compressed-tensors", "compressed-tensors int/fp8 weights "
                                                "(pack-quantized, int-quantized, float-quantized)",
                                                _map_compressed_tensors))
