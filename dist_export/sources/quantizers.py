"""The model's own ModelOpt quantizers as the export's recipe (plan stage).

Runs in the user's process only (`save_quantizer_state`, `export(model)` of a ModelOpt-quantized model); the
ranks of a `--quantizer-state` export read the plain-data file it writes (`quantizer_state.py`, torch alone).
Quantizers are recognised by their class's module (`modelopt.*`) and read through their attributes; ModelOpt
itself is imported only to read the model's mode list (`modelopt_modes`), i.e. only for a model it quantized.

`read_quantizers(model)` turns every quantizer into plain data in checkpoint key space:
  * enabled weight quantizers -> our `QuantSpec` and the quantizer's calibrated amax in our amax layout
    (per tensor [], per channel [out, 1], per group [out, ceil(in/g)], 2-D blocks [ceil(out/b), ceil(in/b)],
    NVFP4: the global amax). A fused-experts quantizer covers one expert's [2I, H] gate_up matrix: its amax is
    split by rows into the gate and up tensors. A pre-quant scale on a *disabled* input quantizer (weight-only
    AWQ) is folded after the fake quant, as ModelOpt's exporter does: `(fq(W) * s[None, :]).to(W.dtype)`;
  * every other quantizer (input, output, KV-cache `*_bmm_quantizer`, fused experts' shared input quantizers,
    expanded to each expert's names) keeps ModelOpt's own properties and buffers for the state file;
  * a quantizer we cannot express (a custom backend, rotation, a bias, unsigned or narrow-range integers,
    learned scales, two-stage W4A8, MX formats, static NVFP4 block scales) is refused by name.
"""
from __future__ import annotations

import math

import torch

from ..layout import SLICE_TAG
from ..numerics import QuantSpec
from ..numerics.registry import format_for_modelopt_bits, format_names, get_format
from ..storage.header import model_signature
from .quantizer_state import STATE_FORMAT, num_bits_key


def is_modelopt_quantizer(module) -> bool:
    return type(module).__module__.startswith("modelopt.") and "Quantizer" in type(module).__name__


def is_modelopt_quantized(model) -> bool:
    return any(is_modelopt_quantizer(m) for m in model.modules())


# ---------------------------------------------------------------------------------- weight quantizers


def _refuse_unexpressible(q, where: str) -> None:
    """A quantizer whose arithmetic our formats do not have: refused by name, never substituted."""
    checks = (
        (getattr(q, "backend", None) is not None, f"custom backend {getattr(q, 'backend', None)!r}"),
        (bool(getattr(q, "_rotate", False)), "rotation"),
        (getattr(q, "_bias", None) is not None, "a quantization bias"),
        (bool(getattr(q, "_unsigned", False)), "unsigned integers"),
        (bool(getattr(q, "_narrow_range", False)), "narrow-range integers"),
        (bool(getattr(q, "_lsq", False)) or bool(getattr(q, "_learn_amax", False)), "learned scales"),
        (not getattr(q, "_fake_quant", True), "real quantization (mtq.compress)"),
        (bool(getattr(q, "_use_constant_amax", False)), "a constant amax"),
        (type(q).__name__ not in ("TensorQuantizer", "StaticBlockScaleQuantizer"), f"a {type(q).__name__}"),
    )
    for bad, what in checks:
        if bad:
            raise ValueError(f"{where}: the quantizer uses {what}, which dist_export cannot reproduce; export this "
                             f"model with ModelOpt's own exporter, or disable that quantizer")


def weight_spec(q, shape: tuple[int, ...], where: str) -> QuantSpec:
    """Our QuantSpec for an enabled weight quantizer acting on a matrix of `shape` [out, in]."""
    _refuse_unexpressible(q, where)
    bits = num_bits_key(q._num_bits)
    fmt = format_for_modelopt_bits(bits)
    bs = q._block_sizes
    if fmt is None:
        known = sorted(str(get_format(n).modelopt_num_bits) for n in format_names()
                       if get_format(n).modelopt_num_bits is not None)
        raise ValueError(f"{where}: num_bits {bits} has no dist_export format; supported: {known}")
    if bs is not None and bs.get("scale_bits") == (8, 0):
        raise ValueError(f"{where}: MX formats (scale_bits (8, 0)) are not supported; use NVFP4, FP8, INT8 or INT4")
    if fmt.modelopt_block_sizes is not None:  # a format with fixed blocks (NVFP4): exactly ModelOpt's description
        want = fmt.modelopt_block_sizes
        if bs is None or any(num_bits_key(bs.get(k)) != v for k, v in want.items()):
            raise ValueError(f"{where}: {fmt.name.upper()} needs block_sizes {want} (static per-block "
                             f"{fmt.name.upper()} scales, e.g. from algorithm 'mse', are not supported); got {bs}")
        return QuantSpec(fmt.name, fmt.default_granularity, fmt.block_size)
    if bs is not None:
        if bs.get("type", "static") != "static" or any(k not in (-1, -2, 0, 1, "type") for k in bs):
            raise ValueError(f"{where}: block_sizes {bs} are not supported; use static blocks along the last dim "
                             f"({{-1: g}}) or FP8 2-D blocks ({{-1: b, -2: b}})")
        last = bs.get(-1, bs.get(1))
        first = bs.get(-2, bs.get(0))
        if first is None:
            return QuantSpec(fmt.name, "group", int(last))
        if "block" not in fmt.granularities or first != last:
            raise ValueError(f"{where}: 2-D blocks {bs} are supported for square blocks of "
                             f"{[n for n in format_names() if 'block' in get_format(n).granularities]} only")
        return QuantSpec(fmt.name, "block", int(last))
    axis = q._axis
    if axis is None:
        return QuantSpec(fmt.name, "tensor")
    if axis in (0, (0,), [0]) or (not fmt.tensor_amax and axis in (-2, (-2,)) and len(shape) == 2):
        return QuantSpec(fmt.name, "channel")
    raise ValueError(f"{where}: axis {axis} is not supported for weights; use axis 0 (per output channel) or None")


def amax_in_our_layout(q, spec: QuantSpec, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """The quantizer's calibrated amax, float32, in the layout `numerics` takes for `spec` on `shape`."""
    amax = getattr(q, "_amax", None)
    if amax is None:
        raise ValueError(f"{where}: the weight quantizer is enabled but has no calibrated amax; calibrate the model "
                         f"(mtq.quantize with a forward loop) before exporting")
    amax = amax.detach().float().cpu()
    want = () if get_format(spec.fmt).tensor_amax else spec.amax_shape(shape)
    if math.prod(want) != amax.numel():
        raise ValueError(f"{where}: amax has {amax.numel()} values, {spec.fmt}/{spec.granularity} on a {list(shape)} "
                         f"weight needs {math.prod(want)}")
    if not torch.isfinite(amax).all() or (amax < 0).any():
        raise ValueError(f"{where}: amax holds negative, NaN or inf values; calibrate the model again")
    return amax.reshape(want).clone()


def row_slice(amax: torch.Tensor, spec: QuantSpec, lo: int, hi: int, where: str) -> torch.Tensor:
    """The amax of rows [lo, hi) of the quantized matrix (gate or up half of a fused gate_up expert)."""
    if spec.granularity == "tensor" or get_format(spec.fmt).tensor_amax:
        return amax.clone()
    if spec.granularity in ("channel", "group"):
        return amax[lo:hi].clone()
    b = spec.block_size
    # rows [lo, hi) keep their blocks' amax if the part starts on a block boundary or lies inside one block row
    if lo % b and lo // b != (hi - 1) // b:
        raise ValueError(f"{where}: 2-D blocks of {b} straddle the gate/up boundary at row {lo}; this fused expert "
                         f"cannot be split into checkpoint tensors")
    return amax[lo // b: -(-hi // b)].clone()


# ---------------------------------------------------------------------------------- other quantizers


def quantizer_record(q) -> dict:
    """ModelOpt's properties and buffers of a non-weight quantizer, as plain data (for the state file)."""
    props = q.get_modelopt_state()
    buffers = {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
    return {"properties": plain_data(props), "buffers": buffers}


def plain_data(value):
    """Dicts, lists, tuples, scalars, dtypes and tensors only (loads with `torch.load(weights_only=True)`);
    a pydantic config becomes its dict; anything else is refused by type."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):  # torch.Size too
        return tuple(plain_data(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool, torch.dtype)):
        return value
    if isinstance(value, slice):  # StaticBlockScaleQuantizer._slices; modelopt_kernel.from_plain turns it back
        return {SLICE_TAG: (value.start, value.stop, value.step)}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if hasattr(value, "model_dump"):
        return plain_data(value.model_dump())
    raise ValueError(f"quantizer state holds a {type(value).__name__} ({value!r}), which a weights_only state file "
                     f"cannot carry")


# ---------------------------------------------------------------------------------- the model's quantizers


def _enabled(q) -> bool:
    if isinstance(q, torch.nn.Module) and not hasattr(q, "_disabled"):  # containers (SequentialQuantizer)
        return any(_enabled(sub) for sub in q.children())
    return not q._disabled


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


class _Reader:
    """Walks the model once; fills the plain-data tables of a quantizer state (checkpoint key space)."""

    def __init__(self, model):
        from .keymap import checkpoint_keys

        self.model = model
        self._keys = checkpoint_keys
        self.weights: dict[str, dict] = {}
        self.activations: dict[str, dict] = {}

    def names(self, key: str, t: torch.Tensor) -> list[str]:
        return self._keys(self.model, {key: _meta(t)})[key]

    def module_path(self, module_name: str) -> str:
        """A module's path in checkpoint key space (probe: the name its `.weight` would be saved under)."""
        probe = f"{module_name}.weight"
        out = self._keys(self.model, {probe: torch.empty(1, 1, device="meta")})[probe]
        return out[0][: -len(".weight")] if len(out) == 1 and out[0].endswith(".weight") else module_name

    def add_weight(self, name: str, where: str, spec: QuantSpec, amax: torch.Tensor, pqs, q=None) -> None:
        """`q`: the weight quantizer itself, recorded for `modelopt_kernels` where the rank can rebuild it (a plain
        TensorQuantizer acting on this whole tensor, or with one amax for the tensor)."""
        if name in self.weights:
            raise ValueError(f"{where}: tensor {name!r} has two weight quantizers")
        self.weights[name] = {"quantizer": where, "format": spec.fmt, "granularity": spec.granularity,
                              "block_size": spec.block_size, "amax": amax, "pre_quant_scale": pqs,
                              "modelopt": _kernel_record(q)}

    def linear(self, module_name: str, module, q) -> None:
        where = f"{module_name}.weight_quantizer"
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise ValueError(f"{where}: enabled weight quantizer on a module without a 2-D weight "
                             f"({type(module).__name__}); dist_export cannot place it")
        names = self.names(f"{module_name}.weight", w)
        if len(names) != 1:
            raise ValueError(f"{where}: weight maps to {len(names)} checkpoint tensors; save the model and export "
                             f"the folder with its quantizer state instead")
        spec = weight_spec(q, tuple(w.shape), where)
        amax = amax_in_our_layout(q, spec, tuple(w.shape), where)
        self.add_weight(names[0], where, spec, amax, _folded_pre_quant_scale(module, module_name), q)

    def fused_experts(self, module_name: str, module, attr: str, quantizers) -> None:
        from .keymap import expert_slots

        proj = attr[: -len("_weight_quantizers")]
        w = getattr(module, proj, None)
        where = f"{module_name}.{attr}"
        if w is None or w.dim() != 3 or len(quantizers) != w.shape[0]:
            raise ValueError(f"{where}: expected one quantizer per expert of a 3-D {proj!r} weight")
        names = self.names(f"{module_name}.{proj}", w)
        if names == [f"{module_name}.{proj}"]:
            raise ValueError(f"{where}: quantized stacked experts that checkpoints keep stacked are not supported")
        slots = expert_slots(names)
        pqs = _folded_pre_quant_scale(module, module_name, f"{proj}_input_quantizer")
        for e, q in enumerate(quantizers):
            if not _enabled(q):
                continue
            qwhere = f"{where}.{e}"
            shape = tuple(w.shape[1:])
            spec = weight_spec(q, shape, qwhere)
            amax = amax_in_our_layout(q, spec, shape, qwhere)
            if proj == "gate_up_proj":
                half = shape[0] // 2
                whole = q if amax.numel() == 1 else None  # a per-row amax would need splitting: not rebuilt
                self.add_weight(slots[(e, "gate")], qwhere, spec, row_slice(amax, spec, 0, half, qwhere), pqs, whole)
                self.add_weight(slots[(e, "up")], qwhere, spec, row_slice(amax, spec, half, 2 * half, qwhere), pqs,
                                whole)
            else:
                role = {"down_proj": "down", "up_proj": "up", "gate_proj": "gate"}.get(proj)
                if role is None or (e, role) not in slots:
                    raise ValueError(f"{where}: fused experts weight {proj!r} has no checkpoint names dist_export knows")
                self.add_weight(slots[(e, role)], qwhere, spec, amax, pqs, q)

    def fused_input(self, module_name: str, module, attr: str, q) -> None:
        """A fused-experts shared quantizer (`gate_up_proj_input_quantizer`): one copy per expert's name."""
        from .keymap import expert_slots

        proj = attr[: -len("_input_quantizer")]
        w = getattr(module, proj)
        record = quantizer_record(q)
        for (e, role), name in sorted(expert_slots(self.names(f"{module_name}.{proj}", w)).items()):
            self.activations[f"{name[: -len('.weight')]}.input_quantizer"] = record

    def other(self, module_name: str, attr: str, q) -> None:
        self.activations[f"{self.module_path(module_name)}.{attr}"] = quantizer_record(q)


def _kernel_record(q):
    """The weight quantizer's ModelOpt record, or None where a rank could not rebuild it (a class other than
    TensorQuantizer / StaticBlockScaleQuantizer, or properties a weights_only file cannot hold)."""
    if q is None or type(q).__name__ not in ("TensorQuantizer", "StaticBlockScaleQuantizer"):
        return None
    try:
        return quantizer_record(q)
    except ValueError:
        return None


def _folded_pre_quant_scale(module, module_name: str, attr: str = "input_quantizer"):
    """The pre-quant scale ModelOpt's exporter folds into the weight: one on a disabled input quantizer."""
    inp = getattr(module, attr, None)
    pqs = getattr(inp, "_pre_quant_scale", None) if inp is not None else None
    if pqs is None or _enabled(inp):
        return None
    return pqs.detach().cpu().clone()


def read_quantizers(model) -> dict:
    """{"weights": {checkpoint tensor: entry}, "activations": {checkpoint quantizer path: record}} of a
    ModelOpt-quantized model (see the module docstring)."""
    reader = _Reader(model)
    for module_name, module in model.named_modules():
        if module_name.endswith("_weight_quantizers"):
            continue  # one per expert: read with the fused experts module that owns them
        for attr, child in module.named_children():
            if attr.endswith("_weight_quantizers") and isinstance(child, torch.nn.ModuleList):
                if any(is_modelopt_quantizer(q) and _enabled(q) for q in child):
                    reader.fused_experts(module_name, module, attr, child)
                continue
            if not is_modelopt_quantizer(child):
                continue
            if attr == "weight_quantizer":
                if _enabled(child):
                    reader.linear(module_name, module, child)
            elif attr.endswith("weight_quantizer"):
                if _enabled(child):
                    raise ValueError(f"{module_name}.{attr}: enabled weight quantizer of an unknown kind; "
                                     f"dist_export cannot place it")
            elif attr.endswith("_input_quantizer") and attr != "input_quantizer" and hasattr(module,
                                                                                           attr[: -len("_input_quantizer")]):
                reader.fused_input(module_name, module, attr, child)
            else:
                _refuse_if_enabled_unexpressible(child, f"{module_name}.{attr}")
                reader.other(module_name, attr, child)
    return {"weights": reader.weights, "activations": reader.activations}


def _refuse_if_enabled_unexpressible(q, where: str) -> None:
    if _enabled(q) and (getattr(q, "backend", None) is not None or getattr(q, "_rotate", False)):
        _refuse_unexpressible(q, where)


def _awq_with_active_inputs(modes: list, activations: dict) -> str | None:
    """ModelOpt's exporter re-smooths AWQ models whose input quantizers are enabled (W4A8 AWQ), averaging
    pre-quant scales over shared-input groups and requantizing the weights; dist_export does not."""
    algos = " ".join(str(cfg.get("method", cfg)) if isinstance(cfg, dict) else str(cfg) for _, cfg in modes)
    if "awq" not in algos:
        return None
    for path, rec in sorted(activations.items()):
        if not rec["properties"].get("_disabled", True) and "_pre_quant_scale" in rec["buffers"]:
            return path
    return None


def modelopt_modes(model) -> tuple[list, list, str]:
    """ModelOpt's own mode list [(mode, config)], each mode's metadata besides its quantizer state (e.g.
    `shared_quant_states`) and the version of a quantized model (imports ModelOpt)."""
    try:
        import modelopt.torch.opt as mto
    except ImportError:
        raise ValueError("the model holds ModelOpt quantizers but ModelOpt is not importable here; install it "
                         "with `pip install dist-export[modelopt]`") from None
    state = mto.modelopt_state(model)
    entries = state.get("modelopt_state_dict", [])
    modes = [(mode, plain_data(entry.get("config", {}))) for mode, entry in entries]
    metadata = [plain_data({k: v for k, v in entry.get("metadata", {}).items() if k != "quantizer_state"})
                | {"has_quantizer_state": "quantizer_state" in entry.get("metadata", {})} for _, entry in entries]
    return modes, metadata, str(state.get("modelopt_version", ""))


def build_quantizer_state(model, source) -> dict:
    """The whole quantizer state of a ModelOpt-quantized in-memory model (plain data; see `save`)."""
    tables = read_quantizers(model)
    modes, mode_metadata, version = modelopt_modes(model)
    bad = _awq_with_active_inputs(modes, tables["activations"])
    if bad:
        raise ValueError(f"{bad}: AWQ with enabled input quantizers (W4A8 AWQ) needs ModelOpt's re-smoothing at "
                         f"export, which dist_export does not do; use INT4_AWQ_CFG (weight-only) or ModelOpt's exporter")
    missing = sorted(set(tables["weights"]) - set(source.tensors))
    if missing:
        raise ValueError(f"quantized tensor {missing[0]!r} is not among the tensors the model saves (tied to "
                         f"another?); untie it or disable its quantizer")
    return {"format": STATE_FORMAT, "modelopt_version": version, "modes": modes, "mode_metadata": mode_metadata,
            **tables,
            "signature": model_signature(source.tensors),
            "fingerprints": {name: source.fingerprint(meta) for name, meta in sorted(source.tensors.items())}}
