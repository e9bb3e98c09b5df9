"""`--format vllm-fq`: folded fake-quant weights plus `vllm_fq_modelopt_state.pth` (formats.md section 2)."""
from __future__ import annotations

import io
import logging

import torch

from ..layout import STATE_FILE_NAME
from ..numerics import fake_quant
from .state import build_vllm_fq_state, cpu_unsupported_reason
from . import OutputFormat, register_output_format

log = logging.getLogger(__name__)


def serving_warnings(items) -> list[str]:
    """One line per distinct reason ModelOpt 0.47's vLLM worker cannot serve these input quantizers on CPU."""
    reasons: dict[str, str] = {}
    for item in items:
        if item.quantized and (reason := cpu_unsupported_reason(item.input)):
            reasons.setdefault(reason, item.module)
    return [f"vllm-fq: serve this export on a GPU: {reason} (e.g. {module}.input_quantizer)"
            for reason, module in reasons.items()]


class VllmFakeQuant(OutputFormat):
    name = "vllm-fq"

    def check_items(self, items, recipe):
        for line in serving_warnings(items):
            log.warning("%s", line)

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        return [(item.name, fake_quant(w, item.weight, amax, block_amax))]

    def update_config(self, config, plan, recipe):
        config = dict(config)
        config.pop("quantization_config", None)  # vLLM would try to load real-quant kernels
        return config

    def extra_files(self, plan, recipe, calib):
        buf = io.BytesIO()
        torch.save(build_vllm_fq_state(plan, recipe, calib), buf)
        return {STATE_FILE_NAME: buf.getvalue()}


register_output_format(VllmFakeQuant())
