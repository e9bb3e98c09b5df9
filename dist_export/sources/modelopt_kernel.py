"""`modelopt_kernels`: each weight through the model's own ModelOpt TensorQuantizer (execute stage, every rank).

With `export(..., modelopt_kernels=True)` / `--modelopt-kernels` a rank rebuilds each weight quantizer from the
record the quantizer state carries (ModelOpt's own properties and buffers) and applies it exactly as ModelOpt's
exporter does, `quantizer(W.float()).to(W.dtype)`, on the rank's device. The result is bit for bit ModelOpt's
own export on that device (its CPU `448 * (1/amax)`, its CUDA NVFP4 Triton kernel with `amax * (1/2688)` and
approximate divisions), instead of the exact arithmetic of formats.md. ModelOpt must be importable on every
rank; `plan_checks` refuses, before any write, a quantizer that cannot be rebuilt (named) and formats other
than `vllm-fq`.
"""
from __future__ import annotations

import torch

from ..layout import SLICE_TAG

_BUILT: dict[int, tuple] = {}  # id(record) -> (record, rebuilt quantizer); the record is kept, so ids stay its own


def plan_checks(output_format, values) -> None:
    """Every rank, plan stage: ModelOpt importable, every quantized weight rebuildable, a fake-quant format."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        raise ValueError("modelopt_kernels runs the model's own ModelOpt quantizers on every rank, but ModelOpt is "
                         "not importable here; install it with `pip install dist-export[modelopt]`") from None
    if output_format.name != "vllm-fq":
        raise ValueError(f"modelopt_kernels writes ModelOpt's fake-quant weights: use --format vllm-fq, not "
                         f"{output_format.name}")
    for name, record in sorted(values.kernels.items()):
        if record is None:
            where = values.quantizer_names.get(name, name)
            raise ValueError(f"{where}: modelopt_kernels cannot rebuild this weight quantizer on a rank (a class "
                             f"other than TensorQuantizer/StaticBlockScaleQuantizer, or a per-row amax of a fused "
                             f"expert's gate/up halves); export without modelopt_kernels (dist_export's exact "
                             f"arithmetic)")


def from_plain(value):
    """The inverse of `quantizers.plain_data` where it had to encode (slices)."""
    if isinstance(value, dict):
        if set(value) == {SLICE_TAG}:
            return slice(*value[SLICE_TAG])
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(from_plain(v) for v in value)
    return value


def _rebuild(record: dict, device):
    """ModelOpt's own restore sequence for one quantizer: promote a static block-scale quantizer's class, set
    its properties (registering its buffers), load the buffers."""
    from modelopt.torch.quantization.conversion import maybe_promote_nvfp4_static_quantizer
    from modelopt.torch.quantization.nn import TensorQuantizer

    held = _BUILT.get(id(record))
    if held is None or held[0] is not record:
        q = TensorQuantizer()
        props = from_plain(record["properties"])
        maybe_promote_nvfp4_static_quantizer(q, props)
        q.set_from_modelopt_state(props)
        q.load_state_dict(record["buffers"])
        q.eval()
        held = _BUILT[id(record)] = (record, q)
    return held[1].to(device)


def modelopt_fake_quant(record: dict, w: torch.Tensor) -> torch.Tensor:
    """ModelOpt's exporter's fold of one weight, on w's device."""
    with torch.no_grad():
        return _rebuild(record, w.device)(w.float()).to(w.dtype)
