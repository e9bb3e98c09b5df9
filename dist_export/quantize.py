"""Stage 2 (execute), every rank: quantize one work item on this rank's device (public: also used by `verify`
and the benchmarks' thread-per-GPU baseline).

`device_outputs` returns the output format's tensors for one weight, still on the device; `quantize_item` is
the synchronous host-to-host form.
"""
from __future__ import annotations

import torch

from .calibration.file import fused_input_amax
from .numerics import compute_amax, fake_quant
from .numerics.mse import search_block_amax
from .plan import Item
from .runtime.progress import NO_PROGRESS


def input_amax_for(item: Item, calib: dict) -> torch.Tensor | None:
    if item.input is None or item.input.dynamic:
        return None
    return fused_input_amax(item.module, calib)


def device_outputs(ctx, item: Item, w: torch.Tensor, output_format, calib, group_amax, progress=NO_PROGRESS):
    """Quantize one weight on its device; returns the format's output tensors (still on the device).

    A weight whose quantizer came with the model (`calib.weights`, a `QuantizerValues`; sources/quantizers.py)
    uses that quantizer's calibrated amax (with `modelopt_kernels`: the quantizer itself, rebuilt here); a
    pre-quant scale ModelOpt's exporter folds is folded after."""
    given = getattr(calib, "weights", {}).get(item.name)
    if given is not None:
        amax, pre_quant_scale = given
        record = calib.kernels.get(item.name)
        if record is not None:  # modelopt_kernels: the model's own quantizer, rebuilt on this rank
            from .sources.modelopt_kernel import modelopt_fake_quant

            outs = [(item.name, modelopt_fake_quant(record, w))]
        else:
            outs = output_format.produce(item, w, amax.to(w.device), None, input_amax_for(item, calib))
        if pre_quant_scale is not None:
            outs = output_format.fold_pre_quant_scale(item, outs, pre_quant_scale)
        return outs
    if item.stacked:
        return [(item.name, fold_stack(ctx, item, w, progress))]
    amax = group_amax[item.group].to(w.device) if item.group else compute_amax(w, item.weight, item.name)
    block_amax = None
    if item.weight.scale_search == "mse":
        amax, block_amax = search_block_amax(w, item.weight, amax, tick=progress.tick)
    outs = output_format.produce(item, w, amax, block_amax, input_amax_for(item, calib))
    if item.kv:  # the layer's KV-cache scale rides with its k_proj / v_proj (plan.item_outputs)
        outs = outs + output_format.kv_tensors(item, calib[item.kv].float().reshape(()).to(w.device))
    return outs


def fold_stack(ctx, item: Item, w: torch.Tensor, progress=NO_PROGRESS) -> torch.Tensor:
    """Fake-quant every expert of a 3-D stack as its own [out, in] matrix (shared amax if the recipe says)."""
    def matrix(e):
        return w[e].t() if item.stacked == "in_out" else w[e]

    shared = compute_amax(w.reshape(-1, w.shape[-1]), item.weight, item.name).amax() if item.share_stack else None
    out = torch.empty_like(w)
    for e in range(w.shape[0]):
        m = matrix(e)
        amax = shared if shared is not None else compute_amax(m, item.weight, f"{item.name}[{e}]")
        block_amax = None
        if item.weight.scale_search == "mse":
                amax, block_amax = search_block_amax(m, item.weight, amax)
        y = fake_quant(m, item.weight, amax, block_amax)
        out[e] = y.t() if item.stacked == "in_out" else y
        progress.tick()
    return out


def quantize_item(ctx, item: Item, cpu_tensor: torch.Tensor, output_format, calib, group_amax):
    """The outputs of one item on the host, in `outputs(item)` order (synchronous; used by verify)."""
    if not item.quantized:  # an encoded source weight decodes on the device and comes back
        return [(item.name, cpu_tensor if isinstance(cpu_tensor, torch.Tensor) else cpu_tensor.to(ctx.device).cpu())]
    outs = device_outputs(ctx, item, cpu_tensor.to(ctx.device), output_format, calib, group_amax)
    return [(n, t.to("cpu")) for n, t in outs]
