"""The checkpoint-folder source (plan stage on every rank; reads in the execute stage): validated metadata of a
Hugging Face safetensors folder, then one tensor at a time.

Everything here is safe to run on every rank: it reads headers and the owned tensors' bytes only.
Names from an index cannot escape the folder. An already-quantized source (FP8 blocks, MXFP4,
compressed-tensors; see `quantized.py`) is seen as the weights it encodes: `tensors` holds their decoded names,
dtypes and shapes, `read` returns their stored parts, which decode on the device they are moved to.
"""
from __future__ import annotations

import json
import os

import torch

from ..layout import CONFIG_NAME, INDEX_NAME, QUANTIZER_KEY, SINGLE_NAME
from ..storage.header import CorruptFileError, TensorMeta, file_tensor_metas
from ..storage.reader import read_tensor, safe_join
from .hub import source_root
from .quantized import EncodedMeta, EncodedTensor, aligned, map_source


def _load_json(path: str, what: str):
    """The JSON value of `path`; a file that is not JSON is one line naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); {what}") from None


def read_config(path: str) -> dict:
    """A checkpoint's config.json, which must be a JSON object (a list or a string is refused, not read as {})."""
    fix = "restore the model's config.json (a JSON object with model_type, hidden_size, ...)"
    config = _load_json(path, fix)
    if not isinstance(config, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(config).__name__}, not an object; {fix}")
    return config


def read_weight_map(path: str) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: a non-empty object of tensor name -> file name."""
    fix = f"fix {INDEX_NAME} or re-download the checkpoint"
    index = _load_json(path, fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = f"a JSON {type(index).__name__}" if not isinstance(index, dict) else json.dumps(weight_map)[:60]
        raise CorruptFileError(f"{path}: weight_map must be a non-empty object of tensor name -> file name, got "
                               f"{got}; {fix}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CorruptFileError(f"{path}: weight_map[{name!r}] is {file!r}, not a file name; {fix}")
    return weight_map


class SourceCheckpoint:
    """Metadata of every tensor in a Hugging Face safetensors checkpoint, validated once.

    Checks: the config exists, index entries name existing files and tensors present in those files, no tensor
    appears in two files, headers agree with file sizes.
    """

    def __init__(self, folder: str):
        self.folder = folder
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"model folder {folder} does not exist; pass a Hugging Face checkpoint folder")
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise FileNotFoundError(f"{folder} has no config.json; it is not a Hugging Face checkpoint folder: pass a "
                                    f"folder that holds config.json and the safetensors files")
        self.files = self._list_files()
        self.stored: dict[str, TensorMeta] = {}
        for file in self.files:
            for meta in file_tensor_metas(folder, file):
                if meta.name in self.stored:
                    other = self.stored[meta.name].file
                    raise CorruptFileError(
                        f"tensor {meta.name!r} appears in both {other} and {file}; remove the duplicate from the source"
                    )
                self.stored[meta.name] = meta
        if not self.stored:
            raise CorruptFileError(f"{folder} holds no tensors ({', '.join(self.files) or 'no safetensors file'}); "
                                   f"there is nothing to export: pass a checkpoint folder with its weights")
        self._check_index_against_headers()
        self._config = read_config(self.config_path)
        # quantizer buffers a ModelOpt model's save_pretrained writes (`*_quantizer._amax`) are never weights
        weights = {n: m for n, m in self.stored.items() if not QUANTIZER_KEY.search(n)}
        mapping = map_source(self._config, weights, lambda m: read_tensor(self.folder, m))
        self.tensors: dict[str, TensorMeta | EncodedMeta] = mapping.tensors
        self.quant_method = mapping.method  # the source's quant_method, None for a plain checkpoint

    def _list_files(self) -> list[str]:
        index_path = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(index_path):
            self.index = {"weight_map": read_weight_map(index_path)}
            files = sorted(set(self.index["weight_map"].values()))
            for file in files:
                path = safe_join(self.folder, file, f"file named by {INDEX_NAME}", root=source_root(self.folder))
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{INDEX_NAME} names {file}, which is missing from {self.folder}: restore "
                                        f"or re-download that file")
            return files
        self.index = None
        if os.path.isfile(os.path.join(self.folder, SINGLE_NAME)):
            return [SINGLE_NAME]
        raise FileNotFoundError(f"{self.folder} has no {SINGLE_NAME} or {INDEX_NAME}; only safetensors checkpoints are read")

    def _check_index_against_headers(self) -> None:
        if self.index is None:
            return
        weight_map = self.index["weight_map"]
        for name, file in weight_map.items():
            meta = self.stored.get(name)
            if meta is None or meta.file != file:
                raise CorruptFileError(f"{INDEX_NAME} says {name!r} is in {file}, but that file's header has no "
                                       f"such tensor: fix the index or re-download the checkpoint")
        extra = sorted(set(self.stored) - set(weight_map))
        if extra:
            raise CorruptFileError(f"{len(extra)} tensors are in shard files but not in {INDEX_NAME}, e.g. "
                                   f"{extra[0]!r}: fix the index or re-download the checkpoint")

    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, CONFIG_NAME)

    def load_config(self) -> dict:
        """The config of the model as exported: a quantized source's `quantization_config` is consumed with
        its scales (the output describes only its own quantization)."""
        config = json.loads(json.dumps(self._config))
        if self.quant_method is not None:
            config.pop("quantization_config", None)
        return config

    def read(self, meta, out: torch.Tensor | None = None):
        """One tensor (a view into `out` when given), or an encoded weight's parts (`EncodedTensor`, packed
        into `out` at aligned offsets; `meta.nbytes` must fit)."""
        if not isinstance(meta, EncodedMeta):
            return read_tensor(self.folder, meta, out)
        parts, pos = {}, 0
        for role, part in meta.parts:
            buf = None if out is None else out[pos: pos + part.nbytes]
            parts[role] = read_tensor(self.folder, part, buf)
            pos += aligned(part.nbytes)
        return EncodedTensor(meta, parts)
