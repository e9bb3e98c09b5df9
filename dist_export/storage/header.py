"""The safetensors file layout: 8-byte little-endian header length, JSON header, then raw tensor bytes.

We parse and write headers ourselves because the planner needs every tensor's dtype, shape and byte range
without touching data, and because the writer streams tensors one at a time into a file whose header is known
in advance (bounded memory, no whole-shard buffer).

Every rank: read at plan time (source headers), written in the execute stage (shard headers).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass

import torch

DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
ST_ITEMSIZE = {name: torch.tensor([], dtype=dt).element_size() for name, dt in ST_TO_DTYPE.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


class CorruptFileError(ValueError):
    """A safetensors file whose bytes do not match what its header declares."""


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    name: str
    file: str  # file name relative to the checkpoint folder
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_DTYPE[self.dtype]


def read_header(path: str, label: str | None = None) -> tuple[dict, dict[str, dict]]:
    """(metadata, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file; validates the layout.
    Messages name the file as `label` (default: its base name)."""
    size = os.path.getsize(path)
    name = label or os.path.basename(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CorruptFileError(f"{name}: file too short to be safetensors ({size} bytes); re-download or restore it")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptFileError(f"{name}: header length {n} exceeds the file size {size}; the file is truncated or "
                                  f"corrupt: re-download or restore it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{name}: header is not valid JSON ({e}); the file is corrupt: re-download or "
                                  f"restore it") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{name}: header is not a JSON object; the file is corrupt: re-download or restore it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptFileError(f"{name}: __metadata__ is not an object; the file is corrupt: re-download or restore it")
    _check_layout(name, header, data_size=size - 8 - n)
    return metadata, header


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, key: str, info) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for types before any arithmetic."""
    fix = "the header is corrupt: re-download or restore the file"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CorruptFileError(f"{name}: header entry {key!r} is malformed (needs dtype, shape, data_offsets); {fix}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise CorruptFileError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}; valid: "
                               f"{sorted(ST_ITEMSIZE)}: re-download or convert the file")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptFileError(f"{name}: tensor {key!r} has shape {shape!r}, not a list of non-negative integers; {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CorruptFileError(f"{name}: tensor {key!r} has data_offsets {offsets!r}, not two integers; {fix}")
    return dtype, shape, offsets[0], offsets[1]


def _check_layout(name: str, header: dict, data_size: int) -> None:
    """Every tensor's byte range matches dtype*shape, ranges tile the data area exactly (no gaps, no overlap)."""
    spans = []
    for key, info in header.items():
        dtype, shape, begin, end = _entry(name, key, info)
        numel = math.prod(shape)
        if end - begin != numel * ST_ITEMSIZE[dtype] or begin < 0:
            raise CorruptFileError(
                f"{name}: tensor {key!r} declares {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{numel * ST_ITEMSIZE[dtype]}; the header lies about sizes: re-download or restore the file"
            )
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            raise CorruptFileError(f"{name}: tensor {key!r} starts at {begin}, expected {pos}; the header is corrupt: "
                                  f"re-download or restore the file")
        pos = end
    if pos != data_size:
        raise CorruptFileError(
            f"{name}: header covers {pos} data bytes but the file holds {data_size}; the file is truncated or "
            f"corrupt: re-download or restore it"
        )


def file_tensor_metas(folder: str, file: str, path: str | None = None) -> list[TensorMeta]:
    """Every tensor of `file` in `folder` (read from `path` when given: the resolved, checked file)."""
    path = path or os.path.join(folder, file)
    _, header = read_header(path, file)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    base = 8 + n
    return [
        TensorMeta(key, file, info["dtype"], tuple(int(d) for d in info["shape"]),
                   base + info["data_offsets"][0], base + info["data_offsets"][1])
        for key, info in header.items()
    ]


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) and each tensor's relative start, tensors laid out in list order.

    The JSON is padded with spaces to a multiple of 8 bytes (as the safetensors library does) so tensor data
    stays aligned.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    starts, pos = [], 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ST_ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        starts.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts


def model_signature(tensors: dict) -> str:
    """A digest of a model's tensor names, dtypes and shapes (no data): binds a calibration or quantizer-state
    file to the model it was made for."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        m = tensors[name]
        h.update(f"{name}|{m.dtype}|{tuple(m.shape)}\n".encode())
    return h.hexdigest()[:32]
