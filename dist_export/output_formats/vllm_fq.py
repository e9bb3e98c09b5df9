"""`--format vllm-fq`: folded fake-quant weights plus `vllm_fq_modelopt_state.pth` (formats.md section 2)."""
from __future__ import annotations

import io

import torch

from ..layout import STATE_FILE_NAME
from ..numerics import fake_quant
from .state import build_vllm_fq_state
from . import OutputFormat, register_output_format


class VllmFakeQuant(OutputFormat):
    name = "vllm-fq"

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
