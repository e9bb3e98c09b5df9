"""Export a transformers model object that is already in memory: on CPU, on GPUs, or dispatched by accelerate
with CPU/disk offload (parameters on the meta device, real values in the hooks' `weights_map`).

`MemorySource` presents the model like a checkpoint folder: every tensor in checkpoint key space (fused 3-D
experts split into per-expert names, with the names transformers itself would save), read one at a time. The
caller's model is never changed: every read returns a fresh host copy, nothing is written back, no hook is
touched, and the export runs under `torch.no_grad()`.

Runs in the user's process on every rank of the launch (plan and execute read through it).
"""
from __future__ import annotations

import contextlib
import math
import re
import shutil
import tempfile

import torch

from ..layout import QUANTIZER_KEY
from ..storage.header import DTYPE_TO_ST, TensorMeta
from .keymap import checkpoint_keys, expert_slots
from .quantizer_state import save_state, tensor_fingerprint
from .quantizers import build_quantizer_state, is_modelopt_quantized

_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
MEMORY_FILE = "<memory>"


class MemorySource:
    def __init__(self, model):
        self.model = model
        self.folder = None
        self.files: list[str] = []
        self._readers: dict[str, tuple] = {}
        self.tensors: dict[str, TensorMeta] = {}
        meta_state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
        quantizer_keys = [k for k in meta_state if QUANTIZER_KEY.search(k)]
        for k in quantizer_keys:
            meta_state.pop(k)  # quantizer state is never written as a tensor; input amax is used below
        self.modelopt = is_modelopt_quantized(model)  # its quantizers are the recipe (sources/quantizers.py)
        self.calibration = {} if self.modelopt else self._input_amax(model, quantizer_keys)
        tied = _tied_output_key(model)
        if tied:
            meta_state.pop(tied, None)
        names = checkpoint_keys(model, meta_state)
        offset = 0
        for key, t in meta_state.items():
            if t.dtype not in DTYPE_TO_ST:
                raise ValueError(f"{key}: dtype {t.dtype} cannot be written to safetensors")
            for ck_name, shape, reader in _expand(key, t, names[key]):
                nbytes = t.element_size() * math.prod(shape)
                self.tensors[ck_name] = TensorMeta(ck_name, MEMORY_FILE, DTYPE_TO_ST[t.dtype], tuple(shape), offset,
                                                   offset + nbytes)
                self._readers[ck_name] = reader
                offset += nbytes

    def _input_amax(self, model, quantizer_keys: list[str]) -> dict[str, torch.Tensor]:
        """Input amax already calibrated in the model (ModelOpt-style `<linear>.input_quantizer._amax`), under
        checkpoint-space quantizer names; weight quantizers are ignored (their amax is recomputed from the
        weights under max calibration); a pre-quant scale would change the weights, so it is refused."""
        pre = [k for k in quantizer_keys if k.endswith("_pre_quant_scale")]
        if pre:
            raise ValueError(f"the model holds a pre-quant scale ({pre[0]!r}, AWQ/SmoothQuant): folding it is not "
                             f"supported; export the model before applying it")
        amax = {}
        for k in quantizer_keys:
            m = re.match(r"^(.*)\.input_quantizer\._amax$", k)
            if m is None:
                continue
            value = model_tensor(model, k).detach().float().cpu()
            if value.numel() != 1:
                raise ValueError(f"{k}: only per-tensor input amax can be used (shape {list(value.shape)})")
            weight_key = f"{m.group(1)}.weight"
            names = checkpoint_keys(model, {weight_key: torch.empty(0, device="meta")}).get(weight_key, [weight_key])
            if len(names) == 1 and names[0].endswith(".weight"):
                amax[f"{names[0][: -len('.weight')]}.input_quantizer"] = value.reshape(())
        return amax

    def _view(self, meta: TensorMeta) -> torch.Tensor:
        key, part = self._readers[meta.name]
        t = model_tensor(self.model, key)
        if part is not None:
            e, lo, hi = part
            t = t[e] if lo is None else t[e, lo:hi]
        return t

    def fingerprint(self, meta: TensorMeta) -> str:
        """The tensor's sampled fingerprint (quantizer_state.tensor_fingerprint), computed where it lies."""
        return tensor_fingerprint(self._view(meta))

    def read(self, meta: TensorMeta, out=None) -> torch.Tensor:
        t = self._view(meta)
        host = torch.empty(meta.shape, dtype=t.dtype)
        host.copy_(t.detach())  # a fresh host copy: the caller's tensors are never handed out
        return host

    def load_config(self) -> dict:
        config = self.model.config.to_diff_dict()
        config.setdefault("architectures", [type(self.model).__name__])  # as save_pretrained records it
        return config


def _expand(key: str, t: torch.Tensor, names: list[str]):
    """(checkpoint name, shape, (memory key, slice)) for one in-memory tensor."""
    m = _FUSED.match(key)
    if m is None or t.dim() != 3 or names == [key]:  # stacks that checkpoints keep stacked (GPT-OSS) stay whole
        if len(names) != 1:
            raise ValueError(f"{key}: in-memory tensor maps to {len(names)} checkpoint tensors; save the model with "
                             f"save_pretrained and export the folder instead")
        return [(names[0], tuple(t.shape), (key, None))]
    slots = expert_slots(names)
    out = []
    for e in range(t.shape[0]):
        if m.group(2) == "gate_up_proj":  # gate = rows [:I], up = rows [I:]
            half = t.shape[1] // 2
            out.append((slots[(e, "gate")], (half, t.shape[2]), (key, (e, 0, half))))
            out.append((slots[(e, "up")], (half, t.shape[2]), (key, (e, half, 2 * half))))
        else:
            out.append((slots[(e, "down")], (t.shape[1], t.shape[2]), (key, (e, None, None))))
    return out


def _tied_output_key(model) -> str | None:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        for name, module in model.named_modules():
            if module is out:
                return f"{name}.weight"
    return None


def model_tensor(model, key: str) -> torch.Tensor:
    """The value of parameter/buffer `key`, from the module or, if offloaded, from accelerate's weights_map."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    t = getattr(module, attr, None)
    if t is not None and t.device.type != "meta":
        return t
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook]) if hook is not None else []
    for h in hooks:
        weights_map = getattr(h, "weights_map", None)
        if weights_map is not None:
            try:
                return weights_map[attr]
            except KeyError:
                continue
    raise ValueError(f"{key}: the parameter is on the meta device and no accelerate hook holds its value "
                     f"(offloaded weights must come with their weights_map); cannot export it")


@contextlib.contextmanager
def in_memory_source(model):
    """(source, side-file folder, quantizer state) for an in-memory model, under `torch.no_grad()`; the side
    folder (generation config; the caller may add the model's own input amax as a calibration file) is removed
    on exit. A ModelOpt-quantized model's quantizers become the quantizer state (its recipe)."""
    with torch.no_grad():
        source = MemorySource(model)
        state = build_quantizer_state(model, source) if source.modelopt else None
        side = tempfile.mkdtemp(prefix="dist_export_side_")
        try:
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(side)
            yield source, side, state
        finally:
            shutil.rmtree(side, ignore_errors=True)


def save_quantizer_state(model, path: str) -> dict:
    """Write a ModelOpt-quantized model's quantizer state to `path` (small; `torch.load(weights_only=True)`).

    `dist-export export --model <the model's checkpoint folder> --quantizer-state path` then exports on every
    rank what `dist_export.export(model, out)` exports in this process, byte for byte. The file records a
    fingerprint of every tensor: a folder whose weights differ (calibration that rescales weights in place, as
    AWQ and SmoothQuant do) is refused; save such a model with `save_pretrained` first and export that folder.
    """
    with torch.no_grad():
        source = MemorySource(model)
        if not source.modelopt:
            raise ValueError("the model has no ModelOpt quantizers (mtq.quantize was not applied): there is no "
                             "quantizer state to save; pass a recipe to dist_export.export instead")
        state = build_quantizer_state(model, source)
    save_state(state, path)
    return {"weights": len(state["weights"]), "activations": len(state["activations"])}
