"""The quantizer-state file and the recipe a model's quantizers make (plan stage, every rank; torch only).

A state file (`dist_export.save_quantizer_state`) is plain data that `torch.load(weights_only=True)` reads
without ModelOpt: `weights` (per quantized checkpoint tensor: our format, granularity, block size, the
calibrated amax in our layout, a pre-quant scale to fold), `activations` (every other quantizer: ModelOpt's
properties and buffers, in checkpoint names), ModelOpt's `modes` (and each mode's other `mode_metadata`) and
version, the model `signature` (names, dtypes, shapes) and a sampled `fingerprints` entry per tensor. `quantizer_recipe` turns it into the export's
recipe (one exact rule per quantized module) and calibration (`QuantizerValues`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

from ..numerics import QuantSpec
from ..numerics.registry import format_for_modelopt_bits
from ..recipe import InputSpec, Recipe, Rule
from ..storage.header import model_signature

STATE_FORMAT = "dist_export-quantizer-state-1"
FINGERPRINT_SAMPLES = 4096


def num_bits_key(value):
    """ModelOpt's `num_bits` (an int, or a list/tuple (exponent, mantissa) bits) as a hashable key."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------- fingerprints


def _sample_step(numel: int) -> int:
    return max(1, numel // FINGERPRINT_SAMPLES)


def _fingerprint(sample: torch.Tensor, shape: tuple[int, ...]) -> str:
    h = hashlib.sha256(f"{sample.dtype}|{tuple(shape)}|".encode())
    h.update(sample.contiguous().view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:32]


def tensor_fingerprint(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and an even sample of at most 4096 elements (on any device; the values decide)."""
    flat = t.detach().reshape(-1)
    return _fingerprint(flat[::_sample_step(flat.numel())][:FINGERPRINT_SAMPLES].cpu(), tuple(t.shape))


def file_fingerprint(folder: str, meta) -> str:
    """`tensor_fingerprint` of a checkpoint tensor, reading only the sampled elements (a memory map)."""
    import numpy as np

    itemsize = meta.nbytes // max(meta.numel, 1)
    if meta.numel == 0:
        return _fingerprint(torch.empty(0, dtype=meta.torch_dtype), meta.shape)
    raw = np.memmap(os.path.join(folder, meta.file), dtype=f"V{itemsize}", mode="r", offset=meta.start,
                    shape=(meta.numel,))
    picked = np.ascontiguousarray(raw[::_sample_step(meta.numel)][:FINGERPRINT_SAMPLES]).view(np.uint8)
    sample = torch.frombuffer(bytearray(picked.tobytes()), dtype=torch.uint8).view(meta.torch_dtype)
    return _fingerprint(sample, meta.shape)


def check_fingerprints(state: dict, folder: str, tensors, path: str) -> None:
    """Refuse a folder whose weights differ from those the quantizer state was saved from (sampled reads)."""
    for name in sorted(tensors):
        want = state["fingerprints"].get(name)
        if want is not None and file_fingerprint(folder, tensors[name]) != want:
            raise ValueError(f"{name} in {folder} differs from the weights {path} was saved from; calibration "
                             f"changed them in place (AWQ, SmoothQuant): save the calibrated model with "
                             f"save_pretrained and export that folder")


def _feed(h, value) -> None:
    if isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + b":")
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())


def state_digest(state: dict) -> str:
    """Digest of a quantizer state's content (every value, every tensor's bytes), for run fingerprints."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()[:32]


def save_state(state: dict, path: str) -> None:
    """Write whole, through a private temporary (never a fixed `.tmp` name, never through a link; atomic.py)."""
    import io

    from ..storage.atomic import write_atomic

    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_state(path: str) -> dict:
    """Read a quantizer-state file with torch alone (`weights_only=True`) and check its format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantizer state file {path} does not exist; write it with "
                                f"dist_export.save_quantizer_state(model, path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"quantizer state file {path} cannot be read ({type(e).__name__}: {e}); write it again "
                         f"with dist_export.save_quantizer_state") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        tag = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a dist_export quantizer state file (format {tag!r}, expected "
                         f"{STATE_FORMAT!r}); write it with dist_export.save_quantizer_state(model, path)")
    return state


# ---------------------------------------------------------------------------------- the recipe they make


def input_spec(record: dict | None):
    """Our InputSpec for a ModelOpt input quantizer (None: disabled, or a kind our plans do not name; its
    ModelOpt record still goes into the state file unchanged)."""
    if record is None:
        return None
    p = record["properties"]
    if p.get("_disabled", True):
        return None
    bits, bs, dynamic = num_bits_key(p.get("_num_bits")), p.get("_block_sizes"), bool(p.get("_dynamic"))
    fmt = format_for_modelopt_bits(bits)
    if fmt is None or not fmt.activations:
        return None
    amax = record["buffers"].get("_amax")
    static_tensor = not dynamic and amax is not None and amax.numel() == 1
    if fmt.block_size is not None:  # dynamic blocks of the format's own size under one static amax (NVFP4)
        if bs and bs.get(-1) == fmt.block_size and amax is not None and amax.numel() == 1:
            return InputSpec(fmt.name, "group", fmt.block_size)
        return None
    if bs is None and p.get("_axis") is None and static_tensor:
        return InputSpec(fmt.name)
    # ModelOpt's dynamic per-token input quantizers (FP8_PER_CHANNEL_PER_TOKEN) are E4M3 only.
    if bits == (4, 3) and dynamic and (bs == {-1: None} or (bs is None and p.get("_axis") is not None)):
        return InputSpec(fmt.name, "token", dynamic=True)
    return None


@dataclass(frozen=True)
class QuantizerRecipe(Recipe):
    """A recipe made of a model's own quantizers: one exact rule per quantized module, every other tensor
    copied (dict look-ups, no patterns: models with many experts stay fast)."""

    modules: dict = field(default_factory=dict, compare=False, repr=False)
    digest: str = ""
    kernels: str = "dist_export"  # or "modelopt": each weight through its own ModelOpt quantizer on the rank

    def excluded_by(self, module: str) -> str | None:
        return None if module in self.modules else "no enabled weight quantizer"

    def rule_for(self, module: str):
        return self.modules.get(module)

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        return ()

    @property
    def needs_calibration(self) -> bool:
        return any(r.input is not None and r.input.needs_calibration for r in self.modules.values())

    def to_dict(self) -> dict:
        def spec(r):
            w, i = r.weight, r.input
            return {"weight": [w.fmt, w.granularity, w.block_size],
                    "input": None if i is None else [i.fmt, i.granularity, i.block_size, i.dynamic]}

        return {"name": self.name, "description": self.description, "quantizer_state": self.digest,
                "weight_arithmetic": self.kernels, "modules": {m: spec(r) for m, r in sorted(self.modules.items())}}


def quantizer_recipe(state: dict, modelopt_kernels: bool = False):
    """(recipe, values) of a quantizer state: the recipe names every quantized module's formats; the values
    hold the calibrated numbers (`QuantizerValues`) and, with `modelopt_kernels`, the weight quantizers' records
    the ranks rebuild (sources/modelopt_kernel.py)."""
    modules = {}
    for name, e in state["weights"].items():
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        inp = input_spec(state["activations"].get(f"{module}.input_quantizer"))
        modules[module] = Rule((module,), QuantSpec(e["format"], e["granularity"], e["block_size"]), inp)
    digest = state_digest({k: v for k, v in state.items() if k != "fingerprints"})
    recipe = QuantizerRecipe(name="modelopt-quantizers", rules=(), default_exclude=False,
                           description=f"the model's own ModelOpt {state.get('modelopt_version', '')} quantizers",
                           modules=modules, digest=digest, kernels="modelopt" if modelopt_kernels else "dist_export")
    values = QuantizerValues.from_state(state)
    if modelopt_kernels:
        values.kernels = {n: e.get("modelopt") for n, e in state["weights"].items()}
    return recipe, values


class QuantizerValues(dict):
    """The calibrated values of a quantizer state, as the export's calibration: the mapping holds every static
    input quantizer's 0-d float32 amax (checkpoint quantizer paths, as a calibration file does); `weights`
    holds, per quantized tensor, (amax in our layout, pre-quant scale to fold or None); `activations` the
    ModelOpt records for the state file."""

    weights: dict
    activations: dict
    modes: list
    mode_metadata: list
    version: str
    quantizer_names: dict
    kernels: dict

    @classmethod
    def from_state(cls, state: dict) -> "QuantizerValues":
        values = cls()
        for path, rec in state["activations"].items():
            amax = rec["buffers"].get("_amax")
            if path.endswith(".input_quantizer") and amax is not None and amax.numel() == 1 \
                    and not rec["properties"].get("_disabled", True):
                values[path] = amax.detach().float().reshape(())
        values.weights = {n: (e["amax"], e["pre_quant_scale"]) for n, e in state["weights"].items()}
        values.quantizer_names = {n: e["quantizer"] for n, e in state["weights"].items()}
        values.kernels = {}
        values.activations = state["activations"]
        values.modes = state.get("modes", [])
        values.mode_metadata = state.get("mode_metadata") or [{"has_quantizer_state": True} for _ in values.modes]
        values.version = state.get("modelopt_version", "")
        return values


def check_recipe_agrees(recipe, qrecipe, values, tensors) -> None:
    """A recipe given together with a quantized model must describe the model's own quantizers; the first
    module (natural order) where they differ stops the export."""
    from ..plan import classify_tensors, plan_groups

    theirs, _ = classify_tensors(tensors, recipe)
    mine = {i.name: i for i in classify_tensors(tensors, qrecipe)[0]}

    def describe(item) -> str:
        if not item.quantized:
            return "not quantized"
        w, i = item.weight, item.input
        inp = "no input quantizer" if i is None else f"input {i.fmt}/{i.granularity}{' dynamic' if i.dynamic else ''}"
        return f"weight {w.fmt}/{w.granularity}{'' if w.block_size is None else f'/{w.block_size}'}, {inp}"

    for item in theirs:
        own = mine[item.name]
        if describe(item) != describe(own):
            raise ValueError(f"recipe {recipe.name!r} disagrees with the model's quantizers at {own.module or item.name}: "
                             f"the recipe says {describe(item)}, the model has {describe(own)}; pass recipe=None to "
                             f"export the model's own quantizers")
    for group, members in sorted(plan_groups(theirs, recipe.share_weight_amax).items()):
        amax = [values.weights[m][0] for m in members]
        if any(not torch.equal(a, amax[0]) for a in amax[1:]):
            raise ValueError(f"recipe {recipe.name!r} shares one weight amax over {list(members)}, but the model's "
                             f"quantizers hold different amax for them; pass recipe=None to export the model's own "
                             f"quantizers")


class FingerprintCheckedSource:
    """A source whose every read is checked against the fingerprints the quantizer state was saved with (on
    the rank that reads it, from the host copy it reads anyway)."""

    def __init__(self, source, fingerprints: dict[str, str], state_path: str):
        self._source = source
        self._fingerprints = fingerprints
        self._state_path = state_path

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read(self, meta, out=None):
        t = self._source.read(meta, out=out)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{meta.name}: --quantizer-state reads the model's weights as the quantized model held "
                             f"them; this folder stores it quantized: pass the bf16/fp16 folder the model was "
                             f"loaded from")
        want = self._fingerprints.get(meta.name)
        if want is not None and tensor_fingerprint(t) != want:
            folder = getattr(self._source, "folder", "the model folder")
            raise ValueError(f"{meta.name} in {folder} differs from the weights {self._state_path} was saved from; "
                             f"calibration changed them in place (AWQ, SmoothQuant): save the calibrated model with "
                             f"save_pretrained and pass that folder as --model")
        return t


def check_signature(state: dict, tensors, path: str, folder: str) -> None:
    if state.get("signature") != model_signature(tensors):
        names = sorted(set(state.get("fingerprints", {})) ^ set(tensors))
        hint = f" (e.g. {names[0]!r} is in only one of them)" if names else " (names agree; dtypes or shapes differ)"
        raise ValueError(f"quantizer state {path} was saved from another model than {folder}{hint}; pass the "
                         f"checkpoint folder the quantized model was loaded from")


def check_format_takes(output_format, values) -> None:
    """Refuse, naming the first one, quantizers the output format cannot carry: a pre-quant scale folded into a
    weight (only fake-quant weights hold it), and, in formats without ModelOpt's state file, any enabled
    quantizer other than a quantized module's input quantizer that the format names (KV cache, outputs)."""
    folded = sorted(n for n, (_, pqs) in values.weights.items() if pqs is not None)
    if folded and not getattr(output_format, "folds_pre_quant_scale", False):
        raise ValueError(f"--format {output_format.name} cannot store {folded[0]} with its pre-quant scale "
                         f"(AWQ/SmoothQuant) "
                         f"folded into the weight; use --format vllm-fq")
    if getattr(output_format, "carries_quantizer_state", False):
        return
    for path, record in sorted(values.activations.items()):
        if record["properties"].get("_disabled", True):
            continue
        module = path.rpartition(".")[0]
        if not (path.endswith(".input_quantizer") and f"{module}.weight" in values.weights and input_spec(record)):
            raise ValueError(f"{path}: --format {output_format.name} cannot carry this enabled quantizer "
                             f"(KV cache, output or "
                             f"an input quantizer it has no field for); use --format vllm-fq, whose state file "
                             f"carries every quantizer, or disable it")


def recipe_from_quantizers(quantizer_state, recipe, source, output_format, modelopt_kernels: bool = False):
    """(recipe, values, source) of an export whose recipe is a model's own quantizers (plan stage, every rank).

    `quantizer_state` is a file from `save_quantizer_state` or the same dict built in memory. The source must
    be the model the state was saved from (signature; a folder's reads are checked against the fingerprints);
    a `recipe` given as well must agree with the quantizers."""
    from ..recipe import load_recipe

    if isinstance(quantizer_state, (str, os.PathLike)):
        path = os.fspath(quantizer_state)
        state = load_state(path)
    else:
        path, state = "the model's quantizer state", quantizer_state
    folder = getattr(source, "folder", None)
    check_signature(state, source.tensors, path, folder or "the in-memory model")
    qrecipe, values = quantizer_recipe(state, modelopt_kernels)
    check_format_takes(output_format, values)
    if modelopt_kernels:
        from .modelopt_kernel import plan_checks

        plan_checks(output_format, values)
    if recipe is not None:
        check_recipe_agrees(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), qrecipe, values,
                            source.tensors)
    if folder is not None:
        source = FingerprintCheckedSource(source, state["fingerprints"], path)
    return qrecipe, values, source
